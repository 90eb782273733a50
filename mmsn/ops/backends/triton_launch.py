"""The launches of SN's Triton kernels (for :mod:`.triton`): arguments,
scratch buffers and grids, one function per pass. Every launch goes
through :func:`_launch` (tests count them there). Only shapes, dtypes,
strides and flags decide anything here: no value is read back.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import triton_kernels as kernels
from .triton_layer import _layer_forward_kernel
from .triton_layer_backward import (_layer_backward_kernel,
                                    _layer_grad_input_kernel)
from .triton_tiles import Tiles, next_power_of_2

_F32 = torch.float32
# BN statistics pooled from this batch's IN ones (else given, or None)
POOLED = 'pooled'
# per-(n, c) gradients, per-tile, per-sample and per-channel sums of the
# backward (see triton_layer_backward)
_ROW_FIELDS, _TILE_FIELDS, _SAMPLE_FIELDS, _CHANNEL_FIELDS = 5, 10, 11, 3


def _launch(kernel, grid: int, *args, num_warps: int = 4, **constexprs):
    kernel[(grid, )](*args, num_warps=num_warps, **constexprs)


def pair(shape, dtype, device):
    """Two tensors of ``shape``, each its own allocation: the layer
    operators' outputs may not alias one another (torch.compile refuses
    it), and the caching allocator starts each on an aligned boundary, as
    torch.compile assumes of them."""
    return (torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device))


def f32(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or (t.dtype == _F32 and t.is_contiguous()):
        return t
    return t.to(_F32).contiguous()


def _contiguous(t: Tensor, count: int, name: str) -> Tensor:
    if t.numel() != count:
        raise ValueError(f'TritonBackend: {name} must have {count} '
                         f'elements, got {t.numel()}')
    return t if t.is_contiguous() else t.contiguous()


class RunningStats(NamedTuple):
    """A layer's BN buffers, moved by a training forward."""
    mean: Tensor
    var: Tensor
    num_batches_tracked: Tensor
    nonfinite: Optional[Tensor]
    momentum: Optional[float]
    moving_average: bool


class Plan:
    """How one call's kernels cover ``x3`` (N, C, L): its tiles, the
    blocks of the (N, C) statistics, and where its tickets come from."""
    __slots__ = ('x3', 't', 'block_r', 'block_n', '_tickets')

    def __init__(self, x3: Tensor, tiles: Tiles, small_tile: int,
                 tickets) -> None:
        n, c, _ = x3.shape
        self.x3, self.t = x3, tiles
        self.block_r = min(next_power_of_2(c), small_tile)
        self.block_n = min(next_power_of_2(n),
                           max(1, small_tile // tiles.block_c))
        self._tickets = tickets

    def tickets(self, count: int) -> Tensor:
        return self._tickets.get(self.x3.device, count)

    def tile_args(self):
        t = self.t
        return t.c_blocks, t.splits, t.chunk

    def blocks(self, **extra):
        t = self.t
        return dict(BLOCK_C=t.block_c, BLOCK_L=t.block_l,
                    num_warps=t.num_warps, **extra)


# -- the four passes -------------------------------------------------------
def moments(plan: Plan, correction: int):
    """(mean_in, var_in), float32 (N, C): one launch, split rows merged by
    the last split of each tile."""
    x3, t = plan.x3, plan.t
    n, c, length = x3.shape
    mean, var = pair((n, c), _F32, x3.device)
    if mean.numel() == 0:
        return mean, var
    rows, split = n * c, t.splits > 1
    part = torch.empty(2, t.splits, rows, dtype=_F32,
                       device=x3.device) if split else mean
    _launch(kernels._moments_kernel, t.programs, x3, mean, var, part,
            plan.tickets(n * t.c_blocks if split else 1), c, length,
            *x3.stride(), *plan.tile_args(), rows,
            float(length - correction), **plan.blocks(SPLIT=split))
    return mean, var


def rows_affine(plan: Plan, mean_in, scale, shift) -> Tensor:
    x3, t = plan.x3, plan.t
    y = torch.empty_like(x3)
    if y.numel():
        _launch(kernels._affine_kernel, t.programs, x3, y, mean_in, scale,
                shift, x3.shape[1], x3.shape[2], *x3.stride(), *y.stride(),
                *plan.tile_args(), t.programs, **plan.blocks())
    return y


def rows_grad_sums(plan: Plan, dy, mean_in):
    x3, t = plan.x3, plan.t
    n, c, length = x3.shape
    part = torch.empty(2, t.splits, n * c, dtype=_F32, device=x3.device)
    if part.numel():
        _launch(kernels._grad_sums_kernel, t.programs, dy, x3, mean_in,
                part[0], part[1], c, length, *dy.stride(), *x3.stride(),
                *plan.tile_args(), n * c, **plan.blocks())
    sums = part[:, 0] if t.splits == 1 else part.sum(1)
    return sums[0].view(n, c), sums[1].view(n, c)


def rows_grad_input(plan: Plan, dy, mean_in, a, b, k) -> Tensor:
    x3, t = plan.x3, plan.t
    dx = torch.empty_like(x3)
    if dx.numel():
        _launch(kernels._grad_input_kernel, t.programs, dy, x3, dx, mean_in,
                a, b, k, x3.shape[1], x3.shape[2], *dy.stride(),
                *x3.stride(), *dx.stride(), *plan.tile_args(), t.programs,
                **plan.blocks())
    return dx


# -- the whole layer --------------------------------------------------------
def output(plan: Plan, mean_in, var_in, weight, bias, mean_weight,
           var_weight, softmax: bool, bn, eps: float,
           running: Optional[RunningStats] = None,
           count_eval: Optional[Tensor] = None) -> Tensor:
    """y given the IN statistics: one launch. ``bn``: None (no BN branch),
    POOLED, or given (mean, var); ``running``: move these buffers by the
    pooled statistics; ``count_eval``: the ``nonfinite`` counter of an
    eval call."""
    x3, t = plan.x3, plan.t
    n, c, length = x3.shape
    y = torch.empty_like(x3)
    if y.numel() == 0:
        return y
    k = mean_weight.numel()
    dummy = mean_in
    bn_mean = bn_var = dummy
    if running is not None:  # where the programs of sample 0 put them
        bn_mean, bn_var = torch.empty(2, c, dtype=_F32, device=x3.device)
    elif bn is not None and bn is not POOLED:
        bn_mean = _contiguous(bn[0], c, 'batch mean')
        bn_var = _contiguous(bn[1], c, 'batch variance')
    buffers = (dummy, dummy, dummy, dummy)
    momentum, cumulative, moving = 0.0, False, True
    if running is not None:
        buffers = (_buffer(running.mean, c, 'running_mean'),
                   _buffer(running.var, c, 'running_var'),
                   _buffer(running.num_batches_tracked, 1,
                           'num_batches_tracked'),
                   _counter(running.nonfinite, dummy))
        moving = running.moving_average
        cumulative = running.momentum is None or not moving
        momentum = 0.0 if running.momentum is None else running.momentum
    elif count_eval is not None:
        buffers = (dummy, dummy, dummy, _counter(count_eval, dummy))
    flags = torch.empty(n, dtype=torch.int32, device=x3.device) \
        if count_eval is not None else dummy
    _launch(_layer_forward_kernel, t.programs, x3, y, mean_in, var_in,
            _param(weight, c, dummy), _param(bias, c, dummy),
            _contiguous(mean_weight, k, 'mean_weight'),
            _contiguous(var_weight, k, 'var_weight'), bn_mean, bn_var,
            *buffers, flags, plan.tickets(1), n, c, length, *x3.stride(),
            *y.stride(), *plan.tile_args(), t.programs, float(eps),
            float(momentum),
            **plan.blocks(K=k, SOFTMAX=bool(softmax),
                          HAS_WEIGHT=weight is not None,
                          HAS_BIAS=bias is not None, POOL_BN=bn is POOLED,
                          UPDATE=running is not None,
                          HAS_NONFINITE=(running is not None
                                         and running.nonfinite is not None),
                          CUMULATIVE=cumulative, MOVING_AVERAGE=moving,
                          COUNT_EVAL=count_eval is not None,
                          BLOCK_R=plan.block_r, BLOCK_N=plan.block_n))
    return y


def backward(plan: Plan, dy, mean_in, var_in, weight, mean_weight,
             var_weight, softmax: bool, bn, pooled_grad: bool, eps: float,
             correction: int, need_dx: bool, param_dtype, share_dtype):
    """(dx or empty, d_gamma, d_beta, d_mean_weight, d_var_weight): two
    launches (one without dx). ``bn`` as in :func:`output`;
    ``pooled_grad``: the BN statistics are this batch's pooling (their
    gradient reaches x)."""
    x3, t = plan.x3, plan.t
    n, c, length = x3.shape
    k = mean_weight.numel()
    dev = x3.device
    params = pair((c, ), param_dtype, dev)
    shares = pair((k, ), share_dtype, dev)
    if n * c == 0 or length == 0:
        dx = torch.empty_like(x3) if need_dx else x3.new_empty(0)
        for t in params + shares:
            t.zero_()
        return (dx, *params, *shares)
    rows, tiles, split = n * c, n * t.c_blocks, t.splits > 1
    sizes = [_ROW_FIELDS * rows, _TILE_FIELDS * tiles, _SAMPLE_FIELDS * n,
             _CHANNEL_FIELDS * c, 2 * t.splits * rows if split else 1]
    per_row, per_tile, per_sample, per_channel, part = torch.empty(
        sum(sizes), dtype=_F32, device=dev).split(sizes)
    bn_mean = bn_var = mean_in
    if bn is not None and bn is not POOLED:
        bn_mean = _contiguous(bn[0], c, 'batch mean')
        bn_var = _contiguous(bn[1], c, 'batch variance')
    weights = (_contiguous(mean_weight, k, 'mean_weight'),
               _contiguous(var_weight, k, 'var_weight'))
    flags = dict(K=k, SOFTMAX=bool(softmax))
    _launch(_layer_backward_kernel, t.programs, dy, x3, mean_in, var_in,
            _param(weight, c, mean_in), *weights, bn_mean, bn_var, part,
            per_row, per_tile, per_sample, per_channel, *params, *shares,
            plan.tickets(tiles + n + t.c_blocks + 1), n, c, length,
            *dy.stride(), *x3.stride(), *plan.tile_args(), float(eps),
            **plan.blocks(HAS_WEIGHT=weight is not None,
                          POOL_BN=bn is POOLED, SPLIT=split,
                          BLOCK_R=plan.block_r, BLOCK_N=plan.block_n,
                          **flags))
    dx = x3.new_empty(0)
    if need_dx:
        dx = torch.empty_like(x3)
        _launch(_layer_grad_input_kernel, t.programs, dy, x3, dx, mean_in,
                *weights, per_row, per_sample, per_channel, n, c, length,
                *dy.stride(), *x3.stride(), *dx.stride(), *plan.tile_args(),
                t.programs, float(length - correction),
                **plan.blocks(POOLED_GRAD=bool(pooled_grad), **flags))
    return (dx, *params, *shares)


def _param(t: Optional[Tensor], c: int, dummy: Tensor) -> Tensor:
    """An optional per-channel tensor as a pointer (unused when None: the
    kernel's HAS_* flag is off)."""
    return dummy if t is None else _contiguous(t, c, 'weight and bias')


def _buffer(t: Tensor, count: int, name: str) -> Tensor:
    """A buffer the kernel updates in place."""
    if t is None or t.numel() != count or not t.is_contiguous():
        raise ValueError(f'TritonBackend: {name} must be a contiguous tensor '
                         f'of {count} elements')
    return t


def _counter(nonfinite: Optional[Tensor], dummy: Tensor) -> Tensor:
    if nonfinite is None:
        return dummy
    if nonfinite.dtype != torch.int64:
        raise ValueError('TritonBackend: the nonfinite counter must be int64')
    return _buffer(nonfinite, 4, 'nonfinite')
