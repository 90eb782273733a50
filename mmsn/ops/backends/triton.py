"""SN's row passes in Triton: the backend for CUDA tensors.

Kernels per layer (:mod:`.triton_kernels` over the big tensor,
:mod:`.triton_mixing` for the per-(n, c) algebra, tiled as
:mod:`.triton_tiles` plans):

* training forward: moments (one read of x), then the mixing of the
  per-(n, c) statistics (one small kernel) and the output (one read of x,
  one write of y): 3 launches, plus one merging the moments of rows split
  across programs (long rows, few of them);
* forward with fixed BN statistics (eval): the same 3 (4) launches, no
  host synchronisation in between;
* backward: per-row sums (one read of x and dy), the per-sample and the
  per-channel algebra (two small kernels), the share gradients' final sum
  and dx (one read of x and dy, one write): 5 launches.

Only x and the IN moments are needed for backward. CPU tensors run through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this module
was imported (slow: for tests). float64 is left to other backends.
"""
import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor

# The kernels are checked with triton 3.6 and 3.8; 3.3's interpreter fails
# on them. Older releases make this module unavailable (SN then runs on the
# generic PyTorch backend) rather than risk untested kernels.
MIN_TRITON = (3, 6)
if tuple(int(p) for p in triton.__version__.split('.')[:2]) < MIN_TRITON:
    raise ImportError(
        f'mmsn\'s Triton backend needs triton>='
        f'{".".join(map(str, MIN_TRITON))} (checked with 3.6 and 3.8); '
        f'found triton {triton.__version__}')

from . import triton_kernels as kernels  # noqa: E402
from . import triton_mixing as mixing_kernels  # noqa: E402
from .base import RowBackend  # noqa: E402
from .triton_tiles import (SMALL_TILE, TILE, Tiles, cdiv, column_blocks,
                           default_min_programs, next_power_of_2, plan_tiles,
                           sample_blocks)

_F32 = torch.float32


def kernels_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors)."""
    return not isinstance(kernels._moments_kernel, triton.runtime.JITFunction)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or (t.dtype == _F32 and t.is_contiguous()):
        return t
    return t.to(_F32).contiguous()


def _launch(kernel, grid: int, *args, num_warps: int = 4, **constexprs):
    kernel[(grid, )](*args, num_warps=num_warps, **constexprs)


class TritonBackend(RowBackend):
    """SN's row passes as Triton kernels, for any strides of the (N, C, L)
    view (NCHW, channels_last 4D and 5D) and float32/float16/bfloat16 input
    (statistics in float32, outputs in the input's dtype).

    Args:
        tile (int): Elements per tile of the big tensor.
        small_tile (int): Elements per tile of the (N, C) statistics.
            Tests make both small to run several tiles per row (and per
            sample) on tiny tensors.
        min_programs (int, optional): Split rows when fewer tiles of whole
            rows than this exist. Defaults to 4 per multiprocessor on CUDA
            and 1 (never split) in the interpreter.
    """

    name = 'triton'
    input_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    takes_strided = True
    fused = True

    def __init__(self, tile: int = TILE, small_tile: int = SMALL_TILE,
                 min_programs: Optional[int] = None) -> None:
        self.tile = tile
        self.small_tile = small_tile
        self.min_programs = min_programs

    # -- helpers -----------------------------------------------------------
    def _check(self, x3: Tensor, name: str) -> None:
        if x3.dim() != 3:
            raise ValueError(f'TritonBackend.{name}: expected an (N, C, L) '
                             f'tensor, got shape {tuple(x3.shape)}')
        if x3.dtype not in self.input_dtypes:
            raise TypeError(f'TritonBackend.{name}: expected one of '
                            f'{self.input_dtypes}, got {x3.dtype}')
        if x3.device.type == 'cpu':
            if not kernels_interpreted():
                raise RuntimeError(
                    f'TritonBackend.{name}: CPU tensors run only in Triton\'s '
                    'interpreter: set TRITON_INTERPRET=1 before '
                    'mmsn.ops.backends.triton is first imported')
        elif x3.device.type != 'cuda':
            raise RuntimeError(f'TritonBackend.{name}: expected a CUDA '
                               f'tensor, got one on {x3.device}')
        _, c, length = x3.shape
        if (c - 1) * abs(x3.stride(1)) + (length - 1) * abs(
                x3.stride(2)) >= 2**31:
            raise ValueError(f'TritonBackend.{name}: one sample spans 2^31 '
                             'elements or more; not supported')

    def _tiles(self, x3: Tensor) -> Tiles:
        n, c, length = x3.shape
        _, stride_c, stride_l = x3.stride()
        channels_contiguous = stride_c == 1 and (stride_l != 1 or length == 1)
        min_programs = self.min_programs or default_min_programs(x3.device)
        return plan_tiles(n, c, length, channels_contiguous, self.tile,
                          min_programs)

    @staticmethod
    def _device(x3: Tensor):
        """Launch on x's GPU when it is not the current one."""
        if x3.is_cuda and x3.device.index != torch.cuda.current_device():
            return torch.cuda.device(x3.device)
        return contextlib.nullcontext()

    # -- the four passes ---------------------------------------------------
    def moments(self, x3: Tensor, correction: int):
        self._check(x3, 'moments')
        n, c, length = x3.shape
        if length <= correction:
            raise ValueError(f'TritonBackend.moments: {length} positions '
                             'leave no degrees of freedom for correction '
                             f'{correction}')
        stats = torch.empty(2, n, c, dtype=_F32, device=x3.device)
        mean, var = stats[0], stats[1]
        if stats.numel() == 0:
            return mean, var, None
        t = self._tiles(x3)
        rows, dof = n * c, float(length - correction)
        with self._device(x3):
            if t.splits == 1:
                _launch(kernels._moments_kernel, t.programs, x3, mean, var, c,
                        length, *x3.stride(), t.c_blocks, 1, t.chunk, rows,
                        dof, num_warps=t.num_warps, BLOCK_C=t.block_c,
                        BLOCK_L=t.block_l, SPLIT=False)
                return mean, var, None
            part = torch.empty(2, t.splits, rows, dtype=_F32,
                               device=x3.device)
            _launch(kernels._moments_kernel, t.programs, x3, part[0], part[1],
                    c, length, *x3.stride(), t.c_blocks, t.splits, t.chunk,
                    rows, dof, num_warps=t.num_warps, BLOCK_C=t.block_c,
                    BLOCK_L=t.block_l, SPLIT=True)
            block_s = next_power_of_2(t.splits)
            block_r = min(next_power_of_2(rows),
                          max(1, self.small_tile // block_s))
            _launch(kernels._merge_moments_kernel, cdiv(rows, block_r),
                    x3, part[0], part[1], mean, var, c, x3.stride(0),
                    x3.stride(1), rows, length, t.chunk, t.splits, dof,
                    BLOCK_R=block_r, BLOCK_S=block_s)
        return mean, var, None

    def rows_affine(self, x3: Tensor, scratch, mean_in: Tensor, scale: Tensor,
                    shift: Tensor) -> Tensor:
        self._check(x3, 'rows_affine')
        y = torch.empty_like(x3)
        if y.numel() == 0:
            return y
        t = self._tiles(x3)
        with self._device(x3):
            _launch(kernels._affine_kernel, t.programs, x3, y, _f32(mean_in),
                    _f32(scale), _f32(shift), x3.shape[1], x3.shape[2],
                    *x3.stride(), *y.stride(), t.c_blocks, t.splits, t.chunk,
                    t.programs, num_warps=t.num_warps, BLOCK_C=t.block_c,
                    BLOCK_L=t.block_l)
        return y

    def _grad_sums_parts(self, dy: Tensor, x3: Tensor, mean_in: Tensor):
        """Per-row sums of each split, shaped (2, splits, N * C)."""
        n, c, length = x3.shape
        t = self._tiles(x3)
        part = torch.empty(2, t.splits, n * c, dtype=_F32, device=x3.device)
        if part.numel():
            _launch(kernels._grad_sums_kernel, t.programs, dy, x3,
                    _f32(mean_in), part[0], part[1], c, length, *dy.stride(),
                    *x3.stride(), t.c_blocks, t.splits, t.chunk, n * c,
                    num_warps=t.num_warps, BLOCK_C=t.block_c,
                    BLOCK_L=t.block_l)
        return part

    def rows_grad_sums(self, dy: Tensor, x3: Tensor, mean_in: Tensor):
        self._check(x3, 'rows_grad_sums')
        _check_like(dy, x3, 'rows_grad_sums')
        n, c, _ = x3.shape
        with self._device(x3):
            part = self._grad_sums_parts(dy, x3, mean_in)
        sums = part[:, 0] if part.shape[1] == 1 else part.sum(1)
        return sums[0].view(n, c), sums[1].view(n, c)

    def rows_grad_input(self, dy: Tensor, x3: Tensor, mean_in: Tensor,
                        a: Tensor, b: Tensor, k: Tensor) -> Tensor:
        self._check(x3, 'rows_grad_input')
        _check_like(dy, x3, 'rows_grad_input')
        with self._device(x3):
            return self._grad_input(dy, x3, mean_in, a, b, k)

    def _grad_input(self, dy, x3, mean_in, a, b, k) -> Tensor:
        dx = torch.empty_like(x3)
        if dx.numel() == 0:
            return dx
        t = self._tiles(x3)
        _launch(kernels._grad_input_kernel, t.programs, dy, x3, dx,
                _f32(mean_in), _f32(a), _f32(b), _f32(k), x3.shape[1],
                x3.shape[2], *dy.stride(), *x3.stride(), *dx.stride(),
                t.c_blocks, t.splits, t.chunk, t.programs,
                num_warps=t.num_warps, BLOCK_C=t.block_c, BLOCK_L=t.block_l)
        return dx

    # -- the whole layer ---------------------------------------------------
    def sn_normalize(self, x3, mean_in, var_in, weight, bias, mean_share,
                     var_share, batch_mean, batch_var, eps):
        self._check(x3, 'sn_normalize')
        n, c, _ = x3.shape
        mixing = _Mixing(mean_share, var_share, batch_mean, batch_var)
        coefs = torch.empty(2, n, c, dtype=_F32, device=x3.device)
        if coefs.numel() == 0:
            return torch.empty_like(x3)
        block_n, block_c = sample_blocks(n, c, self.small_tile)
        with self._device(x3):
            _launch(mixing_kernels._mix_forward_kernel,
                    cdiv(n, block_n),
                    _f32(mean_in), _f32(var_in), *mixing.or_dummy(weight),
                    *mixing.or_dummy(bias), *mixing.args(), coefs[0],
                    coefs[1], n, c, float(eps), num_warps=8,
                    HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                    HAS_BN=mixing.has_bn, BLOCK_N=block_n, BLOCK_C=block_c)
        return self.rows_affine(x3, None, mean_in, coefs[0], coefs[1])

    def sn_forward_fixed(self, x3, weight, bias, mean_share, var_share,
                         batch_mean, batch_var, eps, correction):
        mean_in, var_in, _ = self.moments(x3, correction)
        y = self.sn_normalize(x3, mean_in, var_in, weight, bias, mean_share,
                              var_share, batch_mean, batch_var, eps)
        return y, mean_in, var_in

    def sn_backward(self, dy, x3, mean_in, var_in, weight, mean_share,
                    var_share, batch_mean, batch_var, pooled_bn, eps,
                    correction, need_dx):
        self._check(x3, 'sn_backward')
        _check_like(dy, x3, 'sn_backward')
        mixing = _Mixing(mean_share, var_share, batch_mean, batch_var)
        if pooled_bn and not mixing.has_bn:
            raise ValueError('TritonBackend.sn_backward: pooled_bn needs '
                             'batch statistics')
        n, c, length = x3.shape
        rows, k = n * c, mixing.branches
        dev = x3.device
        mean_in, var_in = _f32(mean_in), _f32(var_in)
        if rows == 0 or length == 0:
            return _empty_grads(x3, c, k, need_dx)
        block_n, block_c = sample_blocks(n, c, self.small_tile)
        col_n, col_c = column_blocks(n, c, self.small_tile)
        sample_programs = cdiv(n, block_n)
        column_programs = cdiv(c, col_c)
        # per row: neg_grad_mean, grad_var, d_gamma term, sum(dy), scale
        per_row = torch.empty(5, rows, dtype=_F32, device=dev)
        # per sample: LN mean and the channel sums of the first two rows
        per_sample = torch.empty(3, n, dtype=_F32, device=dev)
        share_parts = torch.empty(
            sample_programs + (column_programs if mixing.has_bn else 0),
            2 * k, dtype=_F32, device=dev)
        param_grads = torch.empty(2, c, dtype=_F32, device=dev)
        coef = torch.empty(2, rows, dtype=_F32, device=dev) if need_dx \
            else per_row
        with self._device(x3):
            part = self._grad_sums_parts(dy, x3, mean_in)
            _launch(mixing_kernels._backward_rows_kernel, sample_programs,
                    part[0], part[1], part.shape[1], mean_in, var_in,
                    *mixing.or_dummy(weight), *mixing.args(), per_row,
                    per_sample, share_parts, n, c, float(eps), num_warps=8,
                    HAS_WEIGHT=weight is not None, HAS_BN=mixing.has_bn, K=k,
                    BLOCK_N=block_n, BLOCK_C=block_c)
            _launch(mixing_kernels._backward_columns_kernel, column_programs,
                    per_row, per_sample, mean_in, *mixing.args(),
                    param_grads[0], param_grads[1], share_parts,
                    sample_programs, coef, n, c, length,
                    float(length - correction), num_warps=8,
                    HAS_BN=mixing.has_bn, POOLED_BN=bool(pooled_bn),
                    NEED_DX=bool(need_dx), BLOCK_N=col_n, BLOCK_C=col_c)
            shares = share_parts.sum(0)
            dx = (self._grad_input(dy, x3, mean_in, per_row[4], coef[0],
                                   coef[1]) if need_dx else
                  x3.new_empty(0))
        return dx, param_grads[0], param_grads[1], shares[:k], shares[k:]


class _Mixing:
    """The importance shares and BN statistics as kernel arguments."""

    def __init__(self, mean_share, var_share, batch_mean, batch_var):
        if (batch_mean is None) != (batch_var is None):
            raise ValueError('TritonBackend: batch mean and variance must be '
                             'given together')
        self.has_bn = batch_mean is not None
        self.branches = 3 if self.has_bn else 2
        if mean_share.numel() != self.branches or \
                var_share.numel() != self.branches:
            raise ValueError(
                f'TritonBackend: expected {self.branches} importance shares '
                'for the means and the variances, got '
                f'{mean_share.numel()} and {var_share.numel()}')
        self.w, self.u = _f32(mean_share), _f32(var_share)
        self.bn = (_f32(batch_mean), _f32(batch_var)) if self.has_bn else (
            self.w, self.w)

    def args(self):
        return (self.w, self.u, *self.bn)

    def or_dummy(self, t):
        """An optional per-channel tensor as one pointer argument (unused
        when None: the kernel's HAS_* flag is off)."""
        return (self.w if t is None else _f32(t), )


def _check_like(dy: Tensor, x3: Tensor, name: str) -> None:
    if dy.shape != x3.shape or dy.device != x3.device or \
            dy.dtype not in TritonBackend.input_dtypes:
        raise ValueError(
            f'TritonBackend.{name}: grad of shape {tuple(dy.shape)}, '
            f'{dy.dtype} on {dy.device} does not match the input '
            f'{tuple(x3.shape)} on {x3.device}')


def _empty_grads(x3, c, k, need_dx):
    """Gradients of an input without elements: zero sums."""
    zeros = x3.new_zeros(2, c, dtype=_F32)
    shares = x3.new_zeros(2 * k, dtype=_F32)
    dx = torch.empty_like(x3) if need_dx else x3.new_empty(0)
    return dx, zeros[0], zeros[1], shares[:k], shares[k:]
