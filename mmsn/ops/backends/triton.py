"""SN in Triton: the backend for CUDA tensors.

Launches per SN layer (:mod:`.triton_kernels` over the big tensor,
:mod:`.triton_layer` and :mod:`.triton_layer_backward` with the per-(n, c)
algebra of :mod:`.triton_stats` inside, tiled as :mod:`.triton_tiles`
plans; arguments in :mod:`.triton_launch`):

* training forward (:meth:`TritonBackend.layer_train`): the moments (one
  read of x), then the output (one read of x, one write of y) with the LN
  and BN pooling, the mixing and the running statistics' update inside:
  2 launches;
* eval forward (:meth:`~TritonBackend.layer_eval`): the same 2;
* backward (:meth:`~TritonBackend.layer_backward`): the row sums (one read
  of x and dy) with the gradients of the per-(n, c) algebra, d_gamma,
  d_beta and the share gradients inside, then dx (one read of x and dy,
  one write): 2 launches, 1 without dx.

Long rows split across programs (few of them) cost no launch: the last
program of a row to finish merges the splits. The functional core's fused
methods (:meth:`~TritonBackend.sn_normalize`, ...) run the same kernels.

Nothing here reads a value back to the host: no ``.item()``, no
``nonzero``, no Python branch on a tensor's value (branches are on shapes,
dtypes, strides and flags), no synchronisation; reductions across programs
are ordered by integer tickets (:mod:`.triton_tickets`), never by float
atomics, so results do not depend on scheduling. The launches can be
captured in a CUDA graph (torch.compile's ``reduce-overhead``).

CPU tensors run through Triton's interpreter when ``TRITON_INTERPRET=1``
was set before this module was imported (slow: for tests). float64 is left
to other backends.
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
from . import triton_launch as launch  # noqa: E402
from .base import RowBackend  # noqa: E402
from .triton_launch import POOLED, RunningStats, f32  # noqa: E402
from .triton_tickets import Tickets  # noqa: E402
from .triton_tiles import (SMALL_TILE, TILE, Tiles,  # noqa: E402
                           default_min_programs, plan_tiles)

_F32 = torch.float32


def kernels_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors)."""
    return not isinstance(kernels._moments_kernel, triton.runtime.JITFunction)


class TritonBackend(RowBackend):
    """SN as Triton kernels, for any strides of the (N, C, L) view (NCHW,
    channels_last 4D and 5D) and float32/float16/bfloat16 input
    (statistics in float32, outputs in the input's dtype).

    Args:
        tile (int): Elements per tile of the big tensor.
        small_tile (int): Elements per block of the (N, C) statistics.
            Tests make both small to run several tiles per row (and several
            blocks per sample and channel) on tiny tensors.
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
        self._tickets = Tickets()

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

    def _plan(self, x3: Tensor) -> launch.Plan:
        return launch.Plan(x3, self._tiles(x3), self.small_tile,
                           self._tickets)

    @staticmethod
    def _device(x3: Tensor):
        """Launch on x's GPU when it is not the current one."""
        if x3.is_cuda and x3.device.index != torch.cuda.current_device():
            return torch.cuda.device(x3.device)
        return contextlib.nullcontext()

    # -- the four passes ---------------------------------------------------
    def moments(self, x3: Tensor, correction: int):
        self._check(x3, 'moments')
        length = x3.shape[2]
        if length <= correction:
            raise ValueError(f'TritonBackend.moments: {length} positions '
                             'leave no degrees of freedom for correction '
                             f'{correction}')
        with self._device(x3):
            mean, var = launch.moments(self._plan(x3), correction)
        return mean, var, None

    def rows_affine(self, x3: Tensor, scratch, mean_in: Tensor, scale: Tensor,
                    shift: Tensor) -> Tensor:
        self._check(x3, 'rows_affine')
        with self._device(x3):
            return launch.rows_affine(self._plan(x3), f32(mean_in),
                                      f32(scale), f32(shift))

    def rows_grad_sums(self, dy: Tensor, x3: Tensor, mean_in: Tensor):
        self._check(x3, 'rows_grad_sums')
        _check_like(dy, x3, 'rows_grad_sums')
        with self._device(x3):
            return launch.rows_grad_sums(self._plan(x3), dy, f32(mean_in))

    def rows_grad_input(self, dy: Tensor, x3: Tensor, mean_in: Tensor,
                        a: Tensor, b: Tensor, k: Tensor) -> Tensor:
        self._check(x3, 'rows_grad_input')
        _check_like(dy, x3, 'rows_grad_input')
        with self._device(x3):
            return launch.rows_grad_input(self._plan(x3), dy, f32(mean_in),
                                          f32(a), f32(b), f32(k))

    # -- the functional core's whole layer (shares, given BN statistics) ---
    def sn_normalize(self, x3, mean_in, var_in, weight, bias, mean_share,
                     var_share, batch_mean, batch_var, eps):
        self._check(x3, 'sn_normalize')
        bn = _given_bn(mean_share, var_share, batch_mean, batch_var)
        with self._device(x3):
            return launch.output(self._plan(x3), f32(mean_in), f32(var_in),
                                 weight, bias, mean_share, var_share, False,
                                 bn, eps)

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
        bn = _given_bn(mean_share, var_share, batch_mean, batch_var)
        if pooled_bn and bn is None:
            raise ValueError('TritonBackend.sn_backward: pooled_bn needs '
                             'batch statistics')
        with self._device(x3):
            return launch.backward(self._plan(x3), dy, f32(mean_in),
                                   f32(var_in), weight, mean_share,
                                   var_share, False, bn, bool(pooled_bn),
                                   eps, correction, need_dx, _F32, _F32)

    # -- the layer operators' kernels (mmsn.ops.layer_kernels) -------------
    def layer_train(self, x, weight, bias, mean_weight, var_weight,
                    running_mean, running_var, num_batches_tracked,
                    nonfinite, softmax, momentum, moving_average, eps,
                    unbiased, update_stats):
        """``switchable_norm_train``: ``(y, mean_in, var_in)``; moves the
        running statistics (or counts a non-finite batch) on the device."""
        x3 = self._layer_rows(x, 'layer_train')
        k = _branches(mean_weight, var_weight)
        running = None
        if k == 3 and update_stats and running_mean is not None:
            running = RunningStats(running_mean, running_var,
                                   num_batches_tracked, nonfinite, momentum,
                                   moving_average)
        with self._device(x3):
            plan = self._plan(x3)
            mean_in, var_in = launch.moments(plan, _correction(x3, unbiased))
            y3 = launch.output(plan, mean_in, var_in, weight, bias,
                               mean_weight, var_weight, softmax,
                               POOLED if k == 3 else None, eps,
                               running=running)
        return _as_input(y3, x), mean_in, var_in

    def layer_eval(self, x, weight, bias, mean_weight, var_weight,
                   running_mean, running_var, nonfinite, softmax, eps,
                   unbiased):
        """``switchable_norm_eval``: ``(y, mean_in, var_in)``; counts a
        call with non-finite statistics in ``nonfinite``."""
        x3 = self._layer_rows(x, 'layer_eval')
        k = _branches(mean_weight, var_weight)
        bn = None
        if k == 3:
            if running_mean is None or running_var is None:
                raise ValueError('TritonBackend.layer_eval: running '
                                 'statistics are needed with a BN branch')
            bn = (running_mean, running_var)
        with self._device(x3):
            plan = self._plan(x3)
            mean_in, var_in = launch.moments(plan, _correction(x3, unbiased))
            y3 = launch.output(plan, mean_in, var_in, weight, bias,
                               mean_weight, var_weight, softmax, bn, eps,
                               count_eval=nonfinite)
        return _as_input(y3, x), mean_in, var_in

    def layer_backward(self, grad_y, x, mean_in, var_in, weight, mean_weight,
                       var_weight, running_mean, running_var, softmax,
                       batch_stats, eps, unbiased, need_dx):
        """``switchable_norm_backward``: gradients of (x, weight, bias,
        mean_weight, var_weight); dx is empty unless ``need_dx``."""
        x3 = self._layer_rows(x, 'layer_backward')
        dy3 = grad_y.reshape(x3.shape)
        _check_like(dy3, x3, 'layer_backward')
        k = _branches(mean_weight, var_weight)
        bn = None
        if k == 3:
            bn = POOLED if batch_stats else (running_mean, running_var)
        param_dtype = weight.dtype if weight is not None else mean_in.dtype
        with self._device(x3):
            dx3, *grads = launch.backward(
                self._plan(x3), dy3, f32(mean_in), f32(var_in), weight,
                mean_weight, var_weight, softmax, bn, bn is POOLED, eps,
                _correction(x3, unbiased), need_dx, param_dtype,
                mean_weight.dtype)
        return (_as_input(dx3, x) if need_dx else x.new_empty(0), *grads)

    def _layer_rows(self, x: Tensor, name: str) -> Tensor:
        if x.dim() < 2 or x.numel() == 0:
            raise ValueError(f'TritonBackend.{name}: expected a non-empty '
                             f'(N, C, ...) input, got shape {tuple(x.shape)}')
        x3 = x.reshape(x.shape[0], x.shape[1], -1)
        self._check(x3, name)
        return x3


def _branches(mean_weight: Tensor, var_weight: Tensor) -> int:
    k = mean_weight.numel()
    if k not in (2, 3) or var_weight.numel() != k:
        raise ValueError(
            'TritonBackend: expected 3 importance weights [IN, LN, BN] or 2 '
            f'[IN, LN] for the means and the variances, got {k} and '
            f'{var_weight.numel()}')
    return k


def _given_bn(mean_share, var_share, batch_mean, batch_var):
    """The fused methods' BN statistics, checked against the shares."""
    if (batch_mean is None) != (batch_var is None):
        raise ValueError('TritonBackend: batch mean and variance must be '
                         'given together')
    k = 2 if batch_mean is None else 3
    if mean_share.numel() != k or var_share.numel() != k:
        raise ValueError(
            f'TritonBackend: expected {k} importance shares for the means '
            f'and the variances, got {mean_share.numel()} and '
            f'{var_share.numel()}')
    return None if batch_mean is None else (batch_mean, batch_var)


def _correction(x3: Tensor, unbiased: bool) -> int:
    # one position has variance 0 by any definition: the biased estimate
    return 1 if unbiased and x3.shape[2] > 1 else 0


def _as_input(y3: Tensor, x: Tensor) -> Tensor:
    """Rows back to x's shape: with x's strides when x is dense (the rows
    are a view of it, NCHW or channels_last alike), else contiguous."""
    return y3.view(x.shape)


def _check_like(dy: Tensor, x3: Tensor, name: str) -> None:
    if dy.shape != x3.shape or dy.device != x3.device or \
            dy.dtype not in TritonBackend.input_dtypes:
        raise ValueError(
            f'TritonBackend.{name}: grad of shape {tuple(dy.shape)}, '
            f'{dy.dtype} on {dy.device} does not match the input '
            f'{tuple(x3.shape)} on {x3.device}')
