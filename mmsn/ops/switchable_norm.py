"""Functional core of Switchable Normalization.

Every SN module (SN1d/2d/3d, SyncSN, SSN) computes its statistics here, so the
math lives in one place:

* IN statistics per (n, c) over the spatial positions, with the authors'
  unbiased variance by default;
* LN and BN statistics derived from the IN ones (mean of means, mean of
  second moments minus the squared mean);
* ``mean = sum_k softmax(mean_weight)_k * mean_k``, likewise for the variance.

Two execution paths give the same numbers:

* :class:`_FusedSwitchableNorm` keeps only the input alive for backward and
  touches the big tensor in two passes forward and two backward, reusing
  PyTorch's native kernels; the tiny per-(n, c) graph in between is
  differentiated by autograd.
* the composite path (plain autograd), used without gradients, under
  ``torch.compile`` and as the fallback for unusual layouts.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

# Given (mean_in, var_in) of shape (N, C), returns (mean_bn, var_bn) of shape
# (C,), or None when the layer has no BN branch.
BatchStatsFn = Callable[[Tensor, Tensor], Optional[Tuple[Tensor, Tensor]]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def in_var_correction(num_positions: int, unbiased: bool) -> int:
    """Bessel correction for the IN variance.

    A single position has no unbiased variance (the authors' layer returns NaN
    there); its variance is 0 by any definition, so the biased estimate is
    used.
    """
    return 1 if unbiased and num_positions > 1 else 0


def batch_stats_from_instance(mean_in: Tensor,
                              var_in: Tensor) -> Tuple[Tensor, Tensor]:
    """BN statistics per channel, pooled from the IN statistics over n."""
    mean_bn = mean_in.mean(0)
    var_bn = (var_in + mean_in.square()).mean(0) - mean_bn.square()
    return mean_bn, var_bn.clamp_min(0)


def layer_stats_from_instance(mean_in: Tensor,
                              var_in: Tensor) -> Tuple[Tensor, Tensor]:
    """LN statistics per sample, pooled from the IN statistics over c."""
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = (var_in + mean_in.square()).mean(1, keepdim=True) \
        - mean_ln.square()
    return mean_ln, var_ln.clamp_min(0)


def mix_statistics(mean_in: Tensor, var_in: Tensor, mean_weight: Tensor,
                   var_weight: Tensor,
                   batch_stats: Optional[Tuple[Tensor, Tensor]],
                   ) -> Tuple[Tensor, Tensor]:
    """Softmax-weighted mean and variance of shape (N, C), order [IN, LN, BN].
    """
    mean_ln, var_ln = layer_stats_from_instance(mean_in, var_in)
    w = torch.softmax(mean_weight.to(mean_in.dtype), 0)
    v = torch.softmax(var_weight.to(mean_in.dtype), 0)
    mean = w[0] * mean_in + w[1] * mean_ln
    var = v[0] * var_in + v[1] * var_ln
    if batch_stats is not None:
        mean_bn, var_bn = batch_stats
        mean = mean + w[2] * mean_bn
        var = var + v[2] * var_bn
    return mean, var


def _scale_shift(mean_in: Tensor, var_in: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], mean_weight: Tensor,
                 var_weight: Tensor, batch_stats_fn: BatchStatsFn,
                 eps: float) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) affine map so that ``y = x * scale + shift``."""
    mean, var = mix_statistics(mean_in, var_in, mean_weight, var_weight,
                               batch_stats_fn(mean_in, var_in))
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def _detached_leaf(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


class _FusedSwitchableNorm(torch.autograd.Function):
    """SN on a contiguous (N, C, L) tensor, saving only the input.

    Backward needs, per (n, c), ``sum(dy)`` and ``sum(dy * (x - mean_in))``;
    ``native_batch_norm_backward`` over a (1, N*C, L) view returns exactly
    these as its weight and bias gradients in one fused pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight,
                batch_stats_fn, eps, correction):
        var_in, mean_in = torch.var_mean(x, dim=2, correction=correction)
        with torch.enable_grad():
            mean_in_leaf = mean_in.detach().requires_grad_()
            var_in_leaf = var_in.detach().requires_grad_()
            params = [
                _detached_leaf(t)
                for t in (weight, bias, mean_weight, var_weight)
            ]
            scale, shift = _scale_shift(mean_in_leaf, var_in_leaf, *params,
                                        batch_stats_fn, eps)
        y = torch.addcmul(shift.detach().unsqueeze(-1), x,
                          scale.detach().unsqueeze(-1))
        ctx.save_for_backward(x, mean_in)
        # The small graph (O(N*C) values) is kept to differentiate it in
        # backward without re-running batch_stats_fn (which may communicate).
        ctx.small_graph = (scale, shift, mean_in_leaf, var_in_leaf, params)
        ctx.correction = correction
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean_in = ctx.saved_tensors
        scale, shift, mean_in_leaf, var_in_leaf, params = ctx.small_graph
        del ctx.small_graph
        n, c, length = x.shape
        grad_y = grad_y.contiguous()
        _, grad_centered, grad_sum = torch.ops.aten.native_batch_norm_backward(
            grad_y.view(1, n * c, length), x.view(1, n * c, length), None,
            None, None, mean_in.reshape(-1),
            torch.ones(n * c, dtype=mean_in.dtype, device=mean_in.device),
            True, 0.0, [False, True, True])
        grad_sum = grad_sum.view(n, c)
        grad_scale = grad_centered.view(n, c) + mean_in * grad_sum
        inputs = [mean_in_leaf, var_in_leaf]
        inputs += [p for p in params if p is not None and p.requires_grad]
        grads = torch.autograd.grad((scale, shift), inputs,
                                    (grad_scale, grad_sum),
                                    allow_unused=True)
        grad_mean_in, grad_var_in = grads[:2]
        param_grads = iter(grads[2:])
        out_param_grads = [
            next(param_grads) if p is not None and p.requires_grad else None
            for p in params
        ]

        grad_x = None
        if ctx.needs_input_grad[0]:
            # d var_in / dx = 2 (x - mean_in) / (L - correction)
            coef_x = grad_var_in * (2.0 / (length - ctx.correction))
            const = grad_mean_in / length - coef_x * mean_in
            grad_x = torch.addcmul(
                const.unsqueeze(-1), x, coef_x.unsqueeze(-1)).addcmul_(
                    grad_y, scale.detach().unsqueeze(-1).to(grad_y.dtype))
        return (grad_x, *out_param_grads, None, None, None)


def _use_fused(x3: Tensor, tensors) -> bool:
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not (x3.requires_grad
            or any(t is not None and t.requires_grad for t in tensors)):
        return False
    return x3.is_contiguous()


def switchable_norm(x: Tensor,
                    weight: Optional[Tensor],
                    bias: Optional[Tensor],
                    mean_weight: Tensor,
                    var_weight: Tensor,
                    batch_stats_fn: BatchStatsFn,
                    eps: float = 1e-5,
                    unbiased: bool = True) -> Tensor:
    """Switchable Normalization of ``x`` with shape (N, C, *spatial).

    Args:
        x (Tensor): Input of at least 2 dimensions; a (N, C) input has one
            position per instance.
        weight (Tensor, optional): Per-channel gamma.
        bias (Tensor, optional): Per-channel beta.
        mean_weight (Tensor): Importance logits for the means, [IN, LN(, BN)].
        var_weight (Tensor): Importance logits for the variances.
        batch_stats_fn (callable): Maps (mean_in, var_in) to the BN
            statistics to mix (batch statistics in training, running ones in
            eval), or None when there is no BN branch.
        eps (float): Added to the variance. Defaults to 1e-5.
        unbiased (bool): Unbiased IN variance as in the authors' code;
            False gives the paper's biased estimate. Defaults to True.

    Returns:
        Tensor: Normalized tensor of x's shape, dtype and memory format.
        Statistics are computed in float32 (or float64 for float64 input).
    """
    n, c = x.shape[:2]
    in_dtype = x.dtype
    x3 = x.reshape(n, c, -1)
    if in_dtype in _LOW_PRECISION:
        x3 = x3.float()
    correction = in_var_correction(x3.shape[2], unbiased)
    with torch.autocast(x.device.type, enabled=False):
        if _use_fused(x3, (weight, bias, mean_weight, var_weight)):
            y3 = _FusedSwitchableNorm.apply(x3, weight, bias, mean_weight,
                                            var_weight, batch_stats_fn, eps,
                                            correction)
        else:
            var_in, mean_in = torch.var_mean(x3, dim=2, correction=correction)
            scale, shift = _scale_shift(mean_in, var_in, weight, bias,
                                        mean_weight, var_weight,
                                        batch_stats_fn, eps)
            y3 = torch.addcmul(
                shift.unsqueeze(-1).to(x3.dtype), x3,
                scale.unsqueeze(-1).to(x3.dtype))
    y = y3.view(x.shape).to(in_dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


__all__ = [
    'switchable_norm', 'mix_statistics', 'batch_stats_from_instance',
    'layer_stats_from_instance', 'in_var_correction', 'BatchStatsFn'
]
