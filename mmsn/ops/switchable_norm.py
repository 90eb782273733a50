"""Entry points of the functional core of Switchable Normalization.

Every SN module (SN1d/2d/3d, SyncSN, SSN) normalizes through
:func:`mixed_norm` (importance shares on the simplex) or its softmax wrapper
:func:`switchable_norm`. Each call picks its path once:

* the composite path (:mod:`.composite`, plain autograd) while a tracer or
  exporter records the call, or when ``MMSN_SN_PATH=composite``;
* otherwise the fast path (:mod:`.function`) over the backend chosen from
  the tensor's device (:mod:`.backends`), which keeps only the input alive
  for backward and touches the big tensor in two passes each way.

Both give the same numbers.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends.base import is_dense, like_input
from ._capture import capturing_graph
from .composite import composite_norm
from .function import fused_norm
from . import library
from .library import layer_ops
from .statistics import (LOW_PRECISION, BatchStats, BatchStatsFn,
                         batch_stats_from_instance, in_var_correction,
                         stats_dtype)


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


def autocast_off(device: torch.device):
    """Disable autocast where it is on (the meta device has none): SN
    computes its statistics and shares in float32 under AMP."""
    if torch.compiler.is_compiling():
        # dynamo records the context (older releases cannot trace
        # is_autocast_available); nothing compiles on meta
        return torch.autocast(device.type, enabled=False)
    if torch.amp.is_autocast_available(device.type) \
            and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Under torch.compile, each layer says how it is traced (SN: as its layer
# operators; SSN: as plain ops, see _SwitchableNorm._compile_as_layer_ops);
# compile_with_layer_ops() forces one way for all (the benchmark compares
# both: tools/analysis/benchmark_norm.py --sections compile).
_compile_with_layer_ops: Optional[bool] = None


@contextlib.contextmanager
def compile_with_layer_ops(enabled: bool = True):
    """Inside the block, torch.compile traces every SN layer as its layer
    operators (``enabled``; opaque to inductor, the eager kernels) or as
    plain ops (inductor fuses them with their neighbours), whatever the
    layer's own choice."""
    global _compile_with_layer_ops
    saved, _compile_with_layer_ops = _compile_with_layer_ops, enabled
    try:
        yield
    finally:
        _compile_with_layer_ops = saved


def layer_ops_for(x: Tensor, under_compile: bool = True):
    """The layer operators (:func:`.library.layer_ops`) where they run
    ``x``: mmsn._C is loaded, no tracer or exporter records the call
    (torch.export never; under torch.compile: when ``under_compile``, the
    layer's choice, or as :func:`compile_with_layer_ops` forces) and no
    path other than the
    device's default is forced (``MMSN_SN_PATH``). None otherwise: the
    layers then call :func:`mixed_norm`."""
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting():
            return None  # an exported program holds plain operators only
        if _compile_with_layer_ops is not None:
            under_compile = _compile_with_layer_ops
        # the tracer reads the loaded operators as a constant (it must not
        # trace a library's loading: SN layers load it when built)
        if not (under_compile and library.loaded_layer_ops() is not None):
            return None
    elif torch.jit.is_tracing():
        return None
    forced = backends.forced_path()
    if forced and forced != backends.default_path(x.device):
        return None
    return layer_ops()


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
            branch. On the meta device (shapes only) the function is not
            called: the batch's own pooling stands in for it.
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
    elif x.is_meta and batch_stats_fn is not None:
        # it may all-reduce or update running statistics: neither has
        # values to work on
        batch_stats_fn = batch_stats_from_instance
    backend = None if capturing_graph() else backends.select(x)
    # a view for every dense layout; the backend decides whether to copy
    x3 = x.reshape(n, c, -1)
    if not x3.is_contiguous() and (backend is None or not (
            backend.takes_strided and is_dense(x3))):
        x3 = x3.contiguous()
    correction = in_var_correction(x3.shape[2], unbiased)
    args = (weight, bias, mean_share, var_share, batch_stats_fn, eps,
            correction)
    with autocast_off(x.device):
        if backend is None:
            y3 = composite_norm(
                x3.float() if x.dtype in LOW_PRECISION else x3, *args)
        else:
            y3 = fused_norm(x3, *args, backend,
                            _needs_grad((x3, weight, bias, mean_share,
                                         var_share)))
    return like_input(y3, x)


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
    dtype = stats_dtype(x.dtype)
    with autocast_off(x.device):
        mean_share = torch.softmax(mean_weight.to(dtype), 0)
        var_share = torch.softmax(var_weight.to(dtype), 0)
    return mixed_norm(x, weight, bias, mean_share, var_share, batch_stats_fn,
                      eps, unbiased)


__all__ = [
    'switchable_norm', 'mixed_norm', 'layer_ops_for', 'compile_with_layer_ops',
    'BatchStatsFn', 'BatchStats', 'in_var_correction'
]
