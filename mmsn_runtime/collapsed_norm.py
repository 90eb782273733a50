"""The normalization an SSN (or near one-hot SN) layer picked, in plain
torch ops."""
from typing import Tuple

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor, nn

#: Statistics a collapsed layer can take its mean and its variance from.
BRANCHES = ('IN', 'LN', 'BN')
_IN, _LN, _BN = range(3)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_input(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in x's dtype, without a no-op ``.to()`` (older ONNX exporters
    trip on one followed by an in-place op)."""
    return y if y.dtype == x.dtype else y.to(x.dtype)


@MODELS.register_module()
class CollapsedNorm(nn.Module):
    """Normalize with the mean of one of IN, LN, BN and the variance of one
    of them, then a per-channel affine map.

    This is what a Switchable Normalization layer computes at inference once
    its shares are one-hot: ``y = (x - mean) / sqrt(var + eps) * w + b``
    with the IN statistics per (n, c) over the positions (variance divided
    by positions - 1 when ``unbiased``, as SN does), the LN statistics per n
    derived from them (``mean_c(mean_in)``, ``mean_c(var_in + (mean_in -
    mean_ln)^2)``) and the BN statistics from ``running_mean`` /
    ``running_var``. BN for both is ``F.batch_norm`` in eval mode, i.e. a
    frozen affine map (see :func:`expose_batch_norms` to fold it into the
    conv before it).

    Which statistics a layer uses is state (the ``sources`` buffer, [mean,
    var] as indices into ``BRANCHES``), so one ``norm_cfg`` builds every
    layer of a network and the checkpoint says what each one picked. The
    picks are cached as Python ints when set or loaded, so the forward has
    no data-dependent control flow (and traces/exports as a fixed graph).

    Args:
        num_features (int): Channels C of the (N, C, ...) input.
        eps (float): Added to the variance. Defaults to 1e-5.
        unbiased (bool): Unbiased IN variance. Defaults to True.
        sources (tuple[str]): Initial (mean, variance) picks, e.g.
            ``('BN', 'IN')``. Defaults to ``('BN', 'BN')``.
    """
    _abbr_ = 'cn'

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 unbiased: bool = True,
                 sources: Tuple[str, str] = ('BN', 'BN')) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.unbiased = unbiased
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.register_buffer('sources', torch.zeros(2, dtype=torch.long))
        self.set_sources(*sources)

    @property
    def picks(self) -> Tuple[str, str]:
        """(mean, variance) statistics, e.g. ``('BN', 'IN')``."""
        return BRANCHES[self._sources[0]], BRANCHES[self._sources[1]]

    def set_sources(self, mean: str, var: str) -> None:
        """Take the mean from ``mean`` and the variance from ``var`` (each
        one of ``'IN'``, ``'LN'``, ``'BN'``)."""
        for pick in (mean, var):
            if pick not in BRANCHES:
                raise ValueError(f'CollapsedNorm picks one of {BRANCHES}, '
                                 f'got {pick!r}')
        with torch.no_grad():
            self.sources.copy_(
                torch.tensor([BRANCHES.index(mean),
                              BRANCHES.index(var)]))
        self._sources = (BRANCHES.index(mean), BRANCHES.index(var))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        codes = self.sources.tolist()
        if any(code not in range(len(BRANCHES)) for code in codes):
            raise ValueError(f'{prefix}sources must hold two indices into '
                             f'{BRANCHES}, got {codes}')
        self._sources = tuple(codes)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            # integer input would be normalized in integer arithmetic (and
            # complex lose its imaginary part); nn.BatchNorm2d refuses both
            raise TypeError(f'{type(self).__name__} expects a floating-point '
                            f'input, got {x.dtype}')
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f'CollapsedNorm expects (N, {self.num_features}, ...) input, '
                f'got shape {tuple(x.shape)}')
        mean_src, var_src = self._sources
        if mean_src == _BN and var_src == _BN:
            return F.batch_norm(x, self.running_mean, self.running_var,
                                self.weight, self.bias, False, 0.0, self.eps)
        n, c = x.shape[:2]
        rows = x.reshape(n, c, -1)
        if rows.dtype in _LOW_PRECISION:
            rows = rows.float()
        positions = rows.shape[2]
        correction = 1 if self.unbiased and positions > 1 else 0
        weight = self.weight.to(rows.dtype)
        bias = self.bias.to(rows.dtype)
        if mean_src == _IN and var_src == _IN:
            # GroupNorm with a group per channel; the unbiased variance is
            # the biased one / keep, folded into eps and the weight
            keep = (positions - correction) / positions
            # the group count as a constant: exporters need it static
            out = F.group_norm(rows, self.num_features, weight * keep**0.5,
                               bias, self.eps * keep)
            return _as_input(out.view(x.shape), x)
        if var_src == _BN:  # the instance means suffice
            mean_in, var_in = rows.mean(-1), None
        else:
            mean_in, var_in = self._instance_moments(rows, correction)
        if _LN in (mean_src, var_src):
            mean_ln = mean_in.mean(1, keepdim=True)
            var_ln = None if var_in is None else (
                var_in + (mean_in - mean_ln).square()).mean(1, keepdim=True)
        else:
            mean_ln = var_ln = None
        mean = (mean_in, mean_ln, self.running_mean.to(rows.dtype))[mean_src]
        var = (var_in, var_ln, self.running_var.to(rows.dtype))[var_src]
        mean, var = torch.broadcast_tensors(mean, var, rows[:, :, 0])[:2]
        return _as_input(
            self._normalize(rows, mean, var, weight, bias).view(x.shape), x)

    def _normalize(self, rows, mean, var, weight, bias):
        """(rows - mean) / sqrt(var + eps) * weight + bias, with (N, C)
        statistics."""
        n, c, _ = rows.shape
        if (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or mean.requires_grad or var.requires_grad):
            scale = weight * torch.rsqrt(var + self.eps)
            shift = bias - mean * scale
            return torch.addcmul(shift.unsqueeze(-1), rows,
                                 scale.unsqueeze(-1))
        # BatchNorm's eval kernel with a channel per (n, c): one pass, about
        # twice as fast as a broadcasting addcmul on the CPU (its statistics
        # take no gradient)
        return F.batch_norm(
            rows.reshape(1, n * c, -1), mean.reshape(-1), var.reshape(-1),
            weight.repeat(n), bias.repeat(n), False, 0.0,
            self.eps).view(rows.shape)

    @staticmethod
    def _instance_moments(rows: Tensor, correction: int):
        """(mean, var) per (n, c) of (N, C, L) rows."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            var, mean = torch.var_mean(rows, -1, correction=correction)
            return mean, var
        # GroupNorm's kernel with a group per channel computes the same
        # stable moments several times faster than var_mean on the CPU (its
        # normalized output is not used); eps 0 gives rstd inf, var 0, for
        # constant rows.
        n, c, positions = rows.shape
        # contiguous: older torch's kernel refuses channels_last rows
        _, mean, rstd = torch.ops.aten.native_group_norm(
            rows.contiguous(), None, None, n, c, positions, c, 0.0)
        var = rstd.pow(-2) * (positions / (positions - correction))
        return mean, var

    def extra_repr(self) -> str:
        mean, var = self.picks
        return (f'{self.num_features}, mean={mean}, var={var}, '
                f'eps={self.eps}, unbiased={self.unbiased}')


def expose_batch_norms(model: nn.Module) -> nn.Module:
    """Replace every :class:`CollapsedNorm` that picked BN for the mean and
    the variance by an ``nn.BatchNorm2d`` in eval mode with its state, in
    place, so that ``mmcv.cnn.fuse_conv_bn(model)`` folds it into the
    convolution before it.

    Returns:
        nn.Module: ``model``.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CollapsedNorm) and \
                    child.picks == ('BN', 'BN'):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps).to(
                    child.weight.device, child.weight.dtype)
                bn.load_state_dict(
                    dict(weight=child.weight, bias=child.bias,
                         running_mean=child.running_mean,
                         running_var=child.running_var),
                    strict=False)
                parent._modules[name] = bn.eval()
    return model
