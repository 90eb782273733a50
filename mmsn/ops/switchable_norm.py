"""Functional core of Switchable Normalization.

Every SN module (SN1d/2d/3d, SyncSN, SSN) computes its statistics here, so the
math lives in one place:

* IN statistics per (n, c) over the spatial positions, with the authors'
  unbiased variance by default;
* LN and BN statistics derived from the IN ones (mean of means, mean of
  ``var_in + (mean_in - mean)^2``, which equals the authors' mean of second
  moments minus the squared mean without its float32 cancellation);
* ``mean = sum_k w_k * mean_k``, likewise for the variance, with importance
  shares ``w`` on the simplex: ``softmax(mean_weight)`` for SN
  (:func:`switchable_norm`); other maps (SSN's SparsestMax) call
  :func:`mixed_norm` with their shares, whose gradient the fast path returns
  in closed form (autograd takes it through the map).

Two execution paths give the same numbers:

* the fast path (:class:`_FusedSwitchableNorm` with gradients, the same
  kernels without): it keeps only the input alive for backward (plus two
  numbers per (n, c)) and touches the big tensor in two passes forward and
  two backward, with the compiled kernels of ``mmsn._C`` on the CPU (or
  PyTorch's native ones when they are not built). The small per-(n, c)
  algebra in between (mixing, LN pooling) is differentiated in
  closed form; only ``batch_stats_fn`` (which may all-reduce) is
  differentiated by autograd.
* the composite path (plain autograd), used under ``torch.compile`` (where
  inductor fuses it) and as the reference in tests. The fast path's
  backward is not differentiable again; for second-order gradients set
  ``MMSN_SN_PATH=composite``.
"""
import contextlib
import os
import warnings
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._extension import load_compiled_ops

# Given (mean_in, var_in) of shape (N, C), returns (mean_bn, var_bn) of shape
# (C,), or None when the layer has no BN branch.
BatchStatsFn = Callable[[Tensor, Tensor], Optional[Tuple[Tensor, Tensor]]]
# What switchable_norm takes: that function, fixed (mean, var) statistics of
# shape (C,) (running statistics), or None (no BN branch).
BatchStats = Union[BatchStatsFn, Tuple[Tensor, Tensor], None]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_aten = torch.ops.aten

# Added to the variance inside GroupNorm's kernel when it is used to get the
# IN moments: keeps its rstd finite for constant rows (and a single
# position) without changing any variance above ~1e-23.
_TINY_VAR = 1e-30

# Set MMSN_SN_PATH=composite to route every call through the composite
# (plain autograd) path, =native to use PyTorch's CPU kernels instead of
# mmsn._C, or =generic to use only device-agnostic kernels in the fast path
# (what non-CPU devices use). For debugging and benchmarking.
_FORCED_PATH = os.environ.get('MMSN_SN_PATH', '')


def in_var_correction(num_positions: int, unbiased: bool) -> int:
    """Bessel correction for the IN variance.

    A single position has no unbiased variance (the authors' layer returns NaN
    there); its variance is 0 by any definition, so the biased estimate is
    used.
    """
    return 1 if unbiased and num_positions > 1 else 0


def _fixed_stats(batch_stats, dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """Fixed BN statistics (or None) in the statistics' dtype."""
    if batch_stats is None:
        return None
    return tuple(t.to(dtype) for t in batch_stats)


def _batch_stats_of(batch_stats: BatchStats, mean_in: Tensor,
                    var_in: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """The BN statistics to mix, in the dtype of the IN ones."""
    if callable(batch_stats):
        return batch_stats(mean_in, var_in)
    return _fixed_stats(batch_stats, mean_in.dtype)


def _pooled_stats(mean_in: Tensor, var_in: Tensor,
                  dim: int) -> Tuple[Tensor, Tensor]:
    mean = mean_in.mean(dim, keepdim=True)
    var = (var_in + (mean_in - mean).square()).mean(dim, keepdim=True)
    return mean, var


class _BatchStatsFromInstance(torch.autograd.Function):
    """:func:`batch_stats_from_instance` with a closed-form backward that
    keeps only ``mean_in`` (already kept by SN), where autograd would keep
    another (N, C) intermediate."""

    @staticmethod
    def forward(ctx, mean_in, var_in):
        mean_bn, var_bn = _pooled_stats(mean_in, var_in, 0)
        ctx.save_for_backward(mean_in)
        return mean_bn.squeeze(0), var_bn.squeeze(0)

    @staticmethod
    def backward(ctx, grad_mean_bn, grad_var_bn):
        mean_in, = ctx.saved_tensors
        # recomputed from mean_in (not saved) so that a double backward sees
        # its dependence on mean_in
        mean_bn = mean_in.mean(0, keepdim=True)
        n = mean_in.shape[0]
        grad_mean_in = grad_var_in = None
        if grad_var_bn is not None:
            grad_var_bn = grad_var_bn / n
            grad_var_in = grad_var_bn.expand_as(mean_in)
            # the derivative through mean_bn vanishes: sum(mean_in - mean_bn)
            # over n is 0
            grad_mean_in = (mean_in - mean_bn) * (2 * grad_var_bn)
        if grad_mean_bn is not None:
            grad_mean_bn = (grad_mean_bn / n).expand_as(mean_in)
            grad_mean_in = grad_mean_bn if grad_mean_in is None \
                else grad_mean_in + grad_mean_bn
        return grad_mean_in, grad_var_in


def batch_stats_from_instance(mean_in: Tensor,
                              var_in: Tensor) -> Tuple[Tensor, Tensor]:
    """BN statistics per channel, pooled from the IN statistics over n.

    ``mean(var_in + (mean_in - mean_bn)^2)`` equals the authors'
    ``mean(var_in + mean_in^2) - mean_bn^2`` exactly in real arithmetic, and
    avoids its cancellation in float32 for inputs with a large mean.
    """
    if torch.compiler.is_compiling() or not (mean_in.requires_grad
                                             or var_in.requires_grad):
        mean_bn, var_bn = _pooled_stats(mean_in, var_in, 0)
        return mean_bn.squeeze(0), var_bn.squeeze(0)
    return _BatchStatsFromInstance.apply(mean_in, var_in)


def layer_stats_from_instance(mean_in: Tensor,
                              var_in: Tensor) -> Tuple[Tensor, Tensor]:
    """LN statistics per sample, pooled from the IN statistics over c (in
    the same cancellation-free form as :func:`batch_stats_from_instance`)."""
    return _pooled_stats(mean_in, var_in, 1)


def mix_statistics(mean_in: Tensor, var_in: Tensor, mean_weight: Tensor,
                   var_weight: Tensor,
                   batch_stats: Optional[Tuple[Tensor, Tensor]],
                   ) -> Tuple[Tensor, Tensor]:
    """Softmax-weighted mean and variance of shape (N, C), order [IN, LN, BN].
    """
    return mix_with_shares(mean_in, var_in,
                           torch.softmax(mean_weight.to(mean_in.dtype), 0),
                           torch.softmax(var_weight.to(mean_in.dtype), 0),
                           batch_stats)


def mix_with_shares(mean_in: Tensor, var_in: Tensor, mean_share: Tensor,
                    var_share: Tensor,
                    batch_stats: Optional[Tuple[Tensor, Tensor]],
                    ) -> Tuple[Tensor, Tensor]:
    """Mean and variance of shape (N, C) mixed with the given importance
    shares, order [IN, LN, BN]."""
    return _mix(mean_in, var_in, mean_share.unbind(), var_share.unbind(),
                layer_stats_from_instance(mean_in, var_in), batch_stats, 0.0)


# ---------------------------------------------------------------------------
# Composite path (plain autograd)
# ---------------------------------------------------------------------------
def _scale_shift(mean_in: Tensor, var_in: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], mean_share: Tensor,
                 var_share: Tensor, batch_stats_fn: BatchStats,
                 eps: float) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) affine map so that ``y = (x - mean_in) * scale + shift``.

    Centering on the instance mean keeps the gamma and importance gradients
    free of the cancellation that ``sum(dy * x)`` suffers for inputs with a
    large mean.
    """
    mean, var = mix_with_shares(mean_in, var_in, mean_share.to(mean_in.dtype),
                                var_share.to(mean_in.dtype),
                                _batch_stats_of(batch_stats_fn, mean_in,
                                                var_in))
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = (mean_in - mean) * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def _composite(x3: Tensor, weight, bias, mean_share, var_share,
               batch_stats_fn, eps, correction) -> Tensor:
    var_in, mean_in = torch.var_mean(x3, dim=2, correction=correction)
    scale, shift = _scale_shift(mean_in, var_in, weight, bias, mean_share,
                                var_share, batch_stats_fn, eps)
    return torch.addcmul(
        shift.unsqueeze(-1), x3 - mean_in.unsqueeze(-1), scale.unsqueeze(-1))


# ---------------------------------------------------------------------------
# Big-tensor kernels of the fast path. (N, C, L) contiguous, float32/64.
# Three implementations of the same four passes, picked per call by
# _row_kernels():
# * 'compiled': mmsn._C (built by the package's install), one pass each;
# * 'native': PyTorch's GroupNorm and BatchNorm CPU kernels on suitable
#   views, the fallback when mmsn._C is not built (several times faster than
#   var_mean / broadcasting addcmul on the CPU, but more passes);
# * 'generic': device-agnostic ops (var_mean is a fast single pass on GPUs).
# ---------------------------------------------------------------------------
_COMPILED, _COMPILED_ERROR = load_compiled_ops()
_warned_native = False


def compiled_kernels_available() -> bool:
    """Whether the CPU kernels of ``mmsn._C`` were built and loaded."""
    return _COMPILED is not None


def _row_kernels(x: Tensor) -> str:
    if x.device.type != 'cpu' or _FORCED_PATH == 'generic':
        return 'generic'
    if _COMPILED is not None and _FORCED_PATH != 'native':
        return 'compiled'
    if _COMPILED is None and os.environ.get('MMSN_WITH_OPS') != '0':
        _warn_native_once()
    return 'native'


def _warn_native_once():
    global _warned_native
    if not _warned_native:
        _warned_native = True
        warnings.warn(
            'mmsn._C could not be loaded; SN on the CPU falls back to '
            'slower PyTorch kernels (same results). Rebuild it with `pip '
            'install --no-build-isolation -e .` against the installed torch '
            f'(or set MMSN_WITH_OPS=0 to silence this). ({_COMPILED_ERROR})',
            RuntimeWarning, stacklevel=2)


# at::internal::GRAIN_SIZE: CPU ops on fewer elements run on one thread.
_GRAIN_SIZE = 32768


@contextlib.contextmanager
def _serial_small_ops(numel: int, device: torch.device):
    """Run the per-(n, c) algebra (dozens of small ops) on one thread.

    With N*C >= 32768 each of these ops would open an OpenMP parallel region;
    a region costs microseconds on an idle machine but up to a scheduler
    time slice (milliseconds) on a busy one, for no gain on so little data.
    """
    threads = torch.get_num_threads()
    if device.type != 'cpu' or numel < _GRAIN_SIZE or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _instance_moments(x3: Tensor, correction: int):
    """IN mean and variance (N, C) and, for the 'native' kernels, a scratch
    buffer holding ``(x - mean_in) * rstd`` that the output is written into
    in place."""
    n, c, length = x3.shape
    kernels = _row_kernels(x3)
    if kernels == 'compiled':
        mean_in, var_in = _COMPILED.instance_moments(x3, correction)
        return mean_in, var_in, None
    if kernels == 'native':
        # GroupNorm with one channel per group = InstanceNorm: one
        # vectorized Welford pass for the moments (no cancellation).
        buf, mean_in, rstd = _aten.native_group_norm(x3, None, None, n, c,
                                                     length, c, _TINY_VAR)
        with _serial_small_ops(n * c, x3.device):
            var_in = rstd.pow(-2)
            if correction:
                var_in.mul_(length / (length - correction))
        return mean_in, var_in, (buf, rstd)
    var_in, mean_in = torch.var_mean(x3, dim=2, correction=correction)
    return mean_in, var_in, None


def _rows_affine(x3: Tensor, scratch, mean_in: Tensor, scale: Tensor,
                 shift: Tensor) -> Tensor:
    """``(x - mean_in) * scale + shift`` per row."""
    n, c, length = x3.shape
    kernels = _row_kernels(x3)
    if kernels == 'compiled':
        return _COMPILED.rows_affine(x3, mean_in, scale.contiguous(),
                                     shift.contiguous())
    if kernels == 'native':
        buf, rstd = scratch
        rows = n * c
        buf1 = buf.view(1, rows, length)
        # buf = (x - mean_in) * rstd; BatchNorm's inference kernel on the
        # (1, N*C, L) view applies a per-row affine map, in place.
        with _serial_small_ops(rows, buf.device):
            alpha = (scale / rstd).reshape(rows)
            ones = torch.ones(rows, dtype=buf.dtype, device=buf.device)
            zeros = torch.zeros(rows, dtype=buf.dtype, device=buf.device)
        _aten.native_batch_norm.out(
            buf1, alpha, shift.reshape(rows), zeros, ones, False, 0.0, 0.0,
            out=buf1, save_mean=buf.new_empty(0),
            save_invstd=buf.new_empty(0))
        return buf
    return torch.addcmul((shift - mean_in * scale).unsqueeze(-1), x3,
                         scale.unsqueeze(-1))


def _rows_grad_sums(grad_y: Tensor, x3: Tensor,
                    mean_in: Tensor) -> Tuple[Tensor, Tensor]:
    """Per row ``sum(dy * (x - mean_in))`` and ``sum(dy)``, in one pass."""
    if _row_kernels(x3) == 'compiled':
        return _COMPILED.rows_grad_sums(grad_y, x3, mean_in)
    # BatchNorm's backward on the (1, N*C, L) view returns exactly these as
    # its weight and bias gradients.
    n, c, length = x3.shape
    rows = n * c
    with _serial_small_ops(rows, x3.device):
        ones = torch.ones(rows, dtype=x3.dtype, device=x3.device)
    _, dot, sum_dy = _aten.native_batch_norm_backward(
        grad_y.view(1, rows, length), x3.view(1, rows, length), None, None,
        None, mean_in.reshape(rows), ones, True, 0.0, [False, True, True])
    return dot.view(n, c), sum_dy.view(n, c)


def _rows_grad_input(grad_y: Tensor, x3: Tensor, mean_in: Tensor, a: Tensor,
                     b: Tensor, k: Tensor) -> Tensor:
    """``a * dy + b * (x - mean_in) + k`` per row."""
    n, c, length = x3.shape
    kernels = _row_kernels(x3)
    if kernels == 'compiled':
        return _COMPILED.rows_grad_input(grad_y, x3, mean_in, a.contiguous(),
                                         b.contiguous(), k.contiguous())
    const = torch.addcmul(k, b, mean_in, value=-1)
    if kernels == 'native':
        rows = n * c
        with _serial_small_ops(rows, x3.device):
            ones = torch.ones(rows, dtype=x3.dtype, device=x3.device)
            zeros = torch.zeros(rows, dtype=x3.dtype, device=x3.device)
        grad_x = _aten.native_batch_norm(
            grad_y.view(1, rows, length), a.reshape(rows),
            const.reshape(rows), zeros, ones, False, 0.0, 0.0)[0]
        return grad_x.addcmul_(x3.view(1, rows, length),
                               b.reshape(1, rows, 1)).view(n, c, length)
    return torch.addcmul(const.unsqueeze(-1), x3,
                         b.unsqueeze(-1)).addcmul_(grad_y, a.unsqueeze(-1))


# ---------------------------------------------------------------------------
# Small per-(n, c) algebra of the fast path, forward and closed-form backward
# ---------------------------------------------------------------------------
def _mix(mean_in, var_in, w, u, ln, batch, eps):
    """Mixed mean and ``var + eps`` (N, C), given the importance shares
    ``w``/``u``, the LN statistics (N, 1) and the BN ones (C,) or None. The
    one formula both paths use (differentiable by autograd too)."""
    mean_small = w[1] * ln[0]
    var_small = u[1] * ln[1] + eps
    if batch is not None:
        mean_small = mean_small + w[2] * batch[0]
        var_small = var_small + u[2] * batch[1]
    return (torch.addcmul(mean_small, w[0], mean_in),
            torch.addcmul(var_small, u[0], var_in))


def _small_forward(mean_in, var_in, weight, bias, w, u, ln, batch, eps):
    mean, var_eps = _mix(mean_in, var_in, w, u, ln, batch, eps)
    rstd = torch.rsqrt(var_eps)
    scale = rstd if weight is None else rstd * weight
    # y = (x - mean_in) * scale + shift
    shift = (mean_in - mean) * scale
    if bias is not None:
        shift += bias
    return mean, rstd, scale, shift


def _probs(mean_share, var_share, dtype):
    return (mean_share.detach().to(dtype).unbind(),
            var_share.detach().to(dtype).unbind())


def _is_default_batch_stats(batch_graph) -> bool:
    node = batch_graph[0].grad_fn
    return (type(node) is _BatchStatsFromInstance._backward_cls
            and batch_graph[1].grad_fn is node)


def _param(t, dtype):
    return None if t is None else t.detach().to(dtype)


def _compiled_output(xf, moments, weight, bias, mean_share, var_share,
                     batch, eps, correction):
    """(y, mean_in, var_in) from mmsn._C: the one-sweep forward when the BN
    statistics are fixed (``moments`` None), else the output pass after the
    given IN moments."""
    args = (_param(weight, xf.dtype), _param(bias, xf.dtype),
            mean_share.detach(), var_share.detach(),
            *(batch or (None, None)), eps)
    if moments is None:
        return _COMPILED.sn_forward_fixed(xf, *args, correction)
    return (_COMPILED.sn_affine(xf, *moments, *args), *moments)


def _differentiable_batch_stats(ctx, batch_stats_fn, mean_in, var_in):
    """The BN statistics, detached, and what backward needs of their
    gradient: (batch, batch_graph, leaves).

    They may be pooled across processes: batch_stats_fn is differentiated by
    autograd (only when the input needs a gradient; the others do not depend
    on it), except for the default pooling, whose gradient the backward
    writes out (``ctx.pooled_bn``) and fixed statistics, which have none.
    """
    with _serial_small_ops(mean_in.numel(), mean_in.device):
        leaves = None
        if ctx.needs_input_grad[0] and callable(batch_stats_fn):
            with torch.enable_grad():
                leaves = (mean_in.detach().requires_grad_(),
                          var_in.detach().requires_grad_())
                batch_graph = batch_stats_fn(*leaves)
        else:
            batch_graph = _batch_stats_of(batch_stats_fn, mean_in, var_in)
        if batch_graph is None:
            return None, None, None
        batch = tuple(t.detach() for t in batch_graph)
        if leaves is None or not any(t.requires_grad for t in batch_graph):
            return batch, None, None
        if _is_default_batch_stats(batch_graph):
            ctx.pooled_bn = True
            return batch, None, None
        return batch, batch_graph, leaves


class _FusedSwitchableNorm(torch.autograd.Function):
    """SN on a contiguous (N, C, L) tensor, saving only the input and the IN
    moments.

    Backward needs, per (n, c), ``sum(dy)`` and ``sum(dy * (x - mean_in))``
    (one fused pass), then the gradient of the small per-(n, c) algebra in
    closed form, then ``dx = a * dy + b * (x - mean_in) + k`` per row (one
    pass). With the compiled kernels all of it is one call to mmsn._C.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean_share, var_share, batch_stats_fn,
                eps, correction):
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        dtype = xf.dtype
        ctx.compiled = _row_kernels(xf) == 'compiled'
        batch_graph = leaves = None
        ctx.pooled_bn = False
        if ctx.compiled and not callable(batch_stats_fn):
            batch = _fixed_stats(batch_stats_fn, dtype)
            y, mean_in, var_in = _compiled_output(
                xf, None, weight, bias, mean_share, var_share, batch, eps,
                correction)
        else:
            mean_in, var_in, scratch = _instance_moments(xf, correction)
            batch, batch_graph, leaves = _differentiable_batch_stats(
                ctx, batch_stats_fn, mean_in, var_in)
            # mmsn._C does the whole layer unless the batch statistics have a
            # gradient of their own (SyncSN)
            ctx.compiled = ctx.compiled and batch_graph is None
            if ctx.compiled:
                y = _compiled_output(xf, (mean_in, var_in), weight, bias,
                                     mean_share, var_share, batch, eps,
                                     correction)[0]
            else:
                with _serial_small_ops(xf.shape[0] * xf.shape[1], xf.device):
                    w, u = _probs(mean_share, var_share, dtype)
                    ln = layer_stats_from_instance(mean_in, var_in)
                    weight_, bias_ = _param(weight, dtype), _param(bias, dtype)
                    _, _, scale, shift = _small_forward(
                        mean_in, var_in, weight_, bias_, w, u, ln, batch, eps)
                y = _rows_affine(xf, scratch, mean_in, scale, shift)
                # small: (K,), (N, 1), (C,)
                ctx.small = (w, u, ln, batch, weight_, bias_)
        if ctx.compiled:
            ctx.small = (batch, _param(weight, dtype), mean_share.detach(),
                         var_share.detach())
        y = y.to(x.dtype)

        ctx.save_for_backward(x, mean_in, var_in)
        ctx.batch_graph = (batch_graph, leaves) if batch_graph else None
        ctx.eps = eps
        ctx.correction = correction
        ctx.param_dtypes = [
            None if t is None else t.dtype
            for t in (weight, bias, mean_share, var_share)
        ]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, mean_in, var_in = ctx.saved_tensors
        need_x, need_w, need_b, need_mw, need_vw = ctx.needs_input_grad[:5]
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        dy = grad_y.contiguous().to(xf.dtype)
        if ctx.compiled:
            batch, weight, mean_share, var_share = ctx.small
            grads = list(_COMPILED.sn_backward(
                dy, xf, mean_in, var_in, weight, mean_share, var_share,
                *(batch or (None, None)), ctx.pooled_bn, ctx.eps,
                ctx.correction, need_x))
            grads[0] = grads[0].to(x.dtype) if need_x else None
            return (*_cast_param_grads(ctx, grads, need_w, need_b, need_mw,
                                       need_vw), None, None, None)
        n, c, length = xf.shape
        w, u, ln, batch, weight, bias = ctx.small

        dot, sum_dy = _rows_grad_sums(dy, xf, mean_in)
        grads = [None] * 5
        with _serial_small_ops(n * c, xf.device):
            mean, rstd, scale, _ = _small_forward(mean_in, var_in, weight,
                                                  None, w, u, ln, batch,
                                                  ctx.eps)
            # y = (x - mean) * scale + beta per row; gradients of the mixed
            # mean and variance:
            grad_centered = torch.addcmul(dot, mean_in - mean, sum_dy)
            neg_grad_mean = scale * sum_dy
            # d rsqrt(var + eps) / dvar = -rstd^3 / 2
            grad_var = grad_centered * (scale * rstd).mul_(rstd).mul_(-0.5)
            if need_w:
                grads[1] = (grad_centered * rstd).sum(0)
            if need_b:
                grads[2] = sum_dy.sum(0)
            gm_row = neg_grad_mean.sum(1, keepdim=True)
            gv_row = grad_var.sum(1, keepdim=True)
            gm_col = gv_col = None
            if batch is not None:
                gm_col = neg_grad_mean.sum(0)
                gv_col = grad_var.sum(0)
            if need_mw:
                grads[3] = -_share_grad(neg_grad_mean, gm_row, gm_col,
                                        mean_in, ln[0], batch, 0)
            if need_vw:
                grads[4] = _share_grad(grad_var, gv_row, gv_col, var_in,
                                       ln[1], batch, 1)
            if need_x:
                coef_x, grad_mean_x = _instance_stats_grads(
                    ctx, mean_in, w, u, ln, batch, neg_grad_mean, grad_var,
                    gm_row, gv_row, gm_col, gv_col, length)
        if need_x:
            grads[0] = _rows_grad_input(dy, xf, mean_in, scale, coef_x,
                                        grad_mean_x).to(x.dtype)
        return (*_cast_param_grads(ctx, grads, True, True, True, True), None,
                None, None)


def _cast_param_grads(ctx, grads, *needed):
    """Parameter gradients in the parameters' dtypes; None where not
    needed."""
    for i, (need, dtype) in enumerate(zip(needed, ctx.param_dtypes), 1):
        if not need or grads[i] is None:
            grads[i] = None
        elif grads[i].dtype != dtype:
            grads[i] = grads[i].to(dtype)
    return grads


def _instance_stats_grads(ctx, mean_in, w, u, ln, batch, neg_grad_mean,
                          grad_var, gm_row, gv_row, gm_col, gv_col, length):
    """Coefficients of ``dx = scale * dy + coef_x * (x - mean_in) + k``
    from the gradients of the mixed statistics, through the IN, LN and BN
    branches."""
    n, c = mean_in.shape
    # pooled stats: mean_p = mean(mean_in), var_p = mean(var_in +
    # (mean_in - mean_p)^2) have d/dmean_in = (1 + 2 g_var (mean_in -
    # mean_p)) / count and d/dvar_in = 1 / count (the term through mean_p
    # vanishes: mean_in - mean_p sums to 0).
    gv_ln = gv_row * (u[1] / c)
    neg_gm_small = gm_row * (w[1] / c)
    gv_small = gv_ln
    if ctx.pooled_bn:
        gv_bn = gv_col * (u[2] / n)
        neg_gm_small = neg_gm_small + gm_col * (w[2] / n)
        gv_small = gv_small + gv_bn
    grad_mean_in = torch.addcmul(neg_gm_small, w[0], neg_grad_mean).neg_()
    grad_mean_in.addcmul_(mean_in - ln[0], gv_ln, value=2)
    if ctx.pooled_bn:
        grad_mean_in.addcmul_(mean_in - batch[0], gv_bn, value=2)
    grad_var_in = torch.addcmul(gv_small, u[0], grad_var)
    if ctx.batch_graph is not None:
        (mean_bn, var_bn), leaves = ctx.batch_graph
        outs, outs_grads = [], []
        for t, g in ((mean_bn, gm_col * -w[2]), (var_bn, gv_col * u[2])):
            if t.requires_grad:
                outs.append(t)
                outs_grads.append(g.to(t.dtype))
        g_m, g_v = torch.autograd.grad(
            outs, leaves, outs_grads, retain_graph=True, allow_unused=True)
        if g_m is not None:
            grad_mean_in += g_m
        if g_v is not None:
            grad_var_in += g_v
    # d var_in / dx = 2 (x - mean_in) / (L - correction), d mean_in / dx = 1/L
    coef_x = grad_var_in * (2.0 / (length - ctx.correction))
    return coef_x, grad_mean_in / length


def _share_grad(grad_mixed, row_sums, col_sums, stat_in, stat_ln, batch,
                index):
    """Gradient of the importance shares, given the gradient of
    ``sum_k share_k * stat_k`` (N, C) and its row/column sums."""
    # mul + sum rather than torch.dot: BLAS would thread a dot product of a
    # few thousand values
    if col_sums is None:
        return torch.stack([(grad_mixed * stat_in).sum(),
                            (row_sums * stat_ln).sum()])
    # Summed around the BN statistic and the common part added once: with a
    # large mean, the three sums would otherwise each round at the scale of
    # the mean, and the softmax's backward takes their differences (SyncSN,
    # whose per-process sums do not cancel as the joined batch's do).
    ref = batch[index]
    common = (col_sums * ref).sum()
    return torch.stack([(grad_mixed * (stat_in - ref)).sum(),
                        (grad_mixed * (stat_ln - ref)).sum(),
                        common.new_zeros(())]) + common


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------
def _fast_forward_no_grad(x3, weight, bias, mean_share, var_share,
                          batch_stats_fn, eps, correction):
    xf = x3.float() if x3.dtype in _LOW_PRECISION else x3
    dtype = xf.dtype
    compiled = _row_kernels(xf) == 'compiled'
    if compiled and not callable(batch_stats_fn):
        batch = _fixed_stats(batch_stats_fn, dtype)
        return _compiled_output(xf, None, weight, bias, mean_share,
                                var_share, batch, eps,
                                correction)[0].to(x3.dtype)
    mean_in, var_in, scratch = _instance_moments(xf, correction)
    with _serial_small_ops(xf.shape[0] * xf.shape[1], xf.device):
        batch = _batch_stats_of(batch_stats_fn, mean_in, var_in)
    if compiled:
        return _compiled_output(xf, (mean_in, var_in), weight, bias,
                                mean_share, var_share, batch, eps,
                                correction)[0].to(x3.dtype)
    with _serial_small_ops(xf.shape[0] * xf.shape[1], xf.device):
        w, u = _probs(mean_share, var_share, dtype)
        ln = layer_stats_from_instance(mean_in, var_in)
        _, _, scale, shift = _small_forward(mean_in, var_in,
                                            _param(weight, dtype),
                                            _param(bias, dtype), w, u, ln,
                                            batch, eps)
    return _rows_affine(xf, scratch, mean_in, scale, shift).to(x3.dtype)


def _check_fixed_stats(batch_stats, channels: int) -> None:
    if not (isinstance(batch_stats, (tuple, list)) and len(batch_stats) == 2
            and all(isinstance(t, Tensor) for t in batch_stats)):
        raise TypeError(
            'batch_stats_fn must be a callable, a (mean, var) pair of '
            f'tensors or None, got {type(batch_stats).__name__}')
    shapes = [tuple(t.shape) for t in batch_stats]
    if any(shape != (channels, ) for shape in shapes):
        raise ValueError(f'fixed BN statistics must have shape ({channels},) '
                         f'for {channels} channels, got {shapes}')


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def mixed_norm(x: Tensor,
               weight: Optional[Tensor],
               bias: Optional[Tensor],
               mean_share: Tensor,
               var_share: Tensor,
               batch_stats_fn: BatchStats,
               eps: float = 1e-5,
               unbiased: bool = True) -> Tensor:
    """Normalize ``x`` of shape (N, C, *spatial) with IN/LN/BN statistics
    mixed by the given importance shares.

    The core of SN (shares = softmax of its logits) and SSN (SparsestMax).
    The shares are differentiated like any input, so autograd carries their
    gradient through whatever map produced them.

    Args:
        x (Tensor): Input of at least 2 dimensions; a (N, C) input has one
            position per instance.
        weight (Tensor, optional): Per-channel gamma.
        bias (Tensor, optional): Per-channel beta.
        mean_share (Tensor): Shares of the means on the simplex,
            [IN, LN(, BN)].
        var_share (Tensor): Shares of the variances.
        batch_stats_fn (callable | tuple | None): The BN statistics to mix:
            a function mapping (mean_in, var_in) of shape (N, C) to
            (mean, var) of shape (C,), called exactly once (batch statistics
            in training); or fixed (mean, var) of shape (C,) (running
            statistics in eval), which lets the CPU kernels normalize each
            sample while it is in cache; or None when there is no BN
            branch.
        eps (float): Added to the variance. Defaults to 1e-5.
        unbiased (bool): Unbiased IN variance as in the authors' code;
            False gives the paper's biased estimate. Defaults to True.

    Returns:
        Tensor: Normalized tensor of x's shape, dtype and memory format.
        Statistics are computed in float32 (or float64 for float64 input).
    """
    n, c = x.shape[:2]
    if not (batch_stats_fn is None or callable(batch_stats_fn)):
        _check_fixed_stats(batch_stats_fn, c)
    in_dtype = x.dtype
    # contiguous (N, C, L); a channels_last input is copied once here
    x3 = x.reshape(n, c, -1).contiguous()
    correction = in_var_correction(x3.shape[2], unbiased)
    args = (weight, bias, mean_share, var_share, batch_stats_fn, eps,
            correction)
    with torch.autocast(x.device.type, enabled=False):
        if _FORCED_PATH == 'composite' or torch.compiler.is_compiling():
            xc = x3.float() if in_dtype in _LOW_PRECISION else x3
            y3 = _composite(xc, *args)
        elif _needs_grad((x3, weight, bias, mean_share, var_share)):
            y3 = _FusedSwitchableNorm.apply(x3, *args)
        else:
            y3 = _fast_forward_no_grad(x3, *args)
    y = y3.view(x.shape).to(in_dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def switchable_norm(x: Tensor,
                    weight: Optional[Tensor],
                    bias: Optional[Tensor],
                    mean_weight: Tensor,
                    var_weight: Tensor,
                    batch_stats_fn: BatchStats,
                    eps: float = 1e-5,
                    unbiased: bool = True) -> Tensor:
    """Switchable Normalization of ``x`` with shape (N, C, *spatial):
    :func:`mixed_norm` with the shares ``softmax(mean_weight)`` and
    ``softmax(var_weight)``.

    Args:
        mean_weight (Tensor): Importance logits for the means, [IN, LN(, BN)].
        var_weight (Tensor): Importance logits for the variances.
        Others: see :func:`mixed_norm`.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        mean_share = torch.softmax(mean_weight.to(dtype), 0)
        var_share = torch.softmax(var_weight.to(dtype), 0)
    return mixed_norm(x, weight, bias, mean_share, var_share, batch_stats_fn,
                      eps, unbiased)


__all__ = [
    'switchable_norm', 'mixed_norm', 'mix_statistics', 'mix_with_shares',
    'batch_stats_from_instance',
    'layer_stats_from_instance', 'in_var_correction', 'BatchStatsFn',
    'BatchStats', 'compiled_kernels_available'
]
