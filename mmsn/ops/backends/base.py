"""The interface every implementation of SN's big-tensor passes provides.

SN touches the big tensor only in a few passes over its rows, x viewed as
(N, C, L) (one row per sample and channel, L positions). Everything between
the passes is per-(n, c) algebra on O(N * C) numbers
(:mod:`mmsn.ops.statistics`). A backend is one implementation of those
passes; one is chosen per call (:func:`mmsn.ops.backends.select`) from the
tensor's device, what is installed and ``MMSN_SN_PATH``.

Conventions shared by all methods:

* ``x3`` is (N, C, L), of a dtype in ``input_dtypes`` (other inputs are
  cast to float32 first). It is contiguous unless the backend sets
  ``takes_strided``; then it is any dense view (no gaps, no overlap), e.g.
  a channels_last input flattened, with strides (L*C, 1, C).
* ``dy`` has x3's shape, dtype and strides.
* Outputs of x's shape (``y``, ``dx``) have x3's dtype and strides
  (allocate them with ``torch.empty_like(x3)``).
* Statistics (``mean_in``, ``var_in``) and per-row coefficients are
  contiguous (N, C) tensors of the statistics dtype: float64 for float64
  input, float32 otherwise (accumulate in at least float32 for
  float16/bfloat16 input). Gradients of per-channel parameters are (C,),
  of the shares (K,), in that dtype.
* ``weight``/``bias`` (C,), ``mean_share``/``var_share`` (K,) and
  ``batch_mean``/``batch_var`` (C,) are detached, contiguous, in the
  statistics dtype. The shares are on the simplex, K = 3 ([IN, LN, BN]) or
  K = 2 ([IN, LN], no BN branch: ``batch_mean``/``batch_var`` are None).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """No gaps and no overlap between the elements (any dim order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()),
                               key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def memory_format_of(x: Tensor) -> Optional[torch.memory_format]:
    """channels_last(_3d) when x is laid out so, else None."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt) \
            and not x.is_contiguous():
        return fmt
    return None


def like_input(y3: Tensor, x: Tensor) -> Tensor:
    """Rows (N, C, L) back to x's shape, dtype and memory format."""
    y = y3.reshape(x.shape)
    if y.dtype != x.dtype:  # no-op .to() calls trip older ONNX exporters
        y = y.to(x.dtype)
    fmt = memory_format_of(x)
    if fmt is not None and not y.is_contiguous(memory_format=fmt):
        y = y.contiguous(memory_format=fmt)
    return y


class RowBackend:
    """Base class: the four row passes are required, the fused whole-layer
    methods are optional (set ``fused = True`` when implemented)."""

    name = 'base'
    input_dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    takes_strided = False
    fused = False

    # -- what the passes are given (not to be overridden) -------------------
    def prepare(self, x3: Tensor) -> Tensor:
        """``x3`` as this backend takes it: cast to float32 when its dtype is
        not in ``input_dtypes``, made contiguous unless ``takes_strided``."""
        if x3.dtype not in self.input_dtypes:
            x3 = x3.float()
        return x3 if self.takes_strided else x3.contiguous()

    def prepare_grad(self, dy: Tensor, x3: Tensor) -> Tensor:
        """``dy`` in the dtype and strides of the prepared ``x3``."""
        dy = dy.to(x3.dtype)
        if dy.stride() == x3.stride():
            return dy
        if x3.is_contiguous():
            return dy.contiguous()
        return torch.empty_like(x3).copy_(dy)

    # -- the four passes ---------------------------------------------------
    def moments(self, x3: Tensor, correction: int):
        """IN statistics per row: ``(mean_in, var_in, scratch)``;
        ``var_in = sum((x - mean_in)^2) / (L - correction)``. ``scratch`` is
        whatever :meth:`rows_affine` may reuse (or None)."""
        raise NotImplementedError

    def rows_affine(self, x3: Tensor, scratch, mean_in: Tensor, scale: Tensor,
                    shift: Tensor) -> Tensor:
        """``y = (x - mean_in) * scale + shift`` per row."""
        raise NotImplementedError

    def rows_grad_sums(self, dy: Tensor, x3: Tensor,
                       mean_in: Tensor) -> Tuple[Tensor, Tensor]:
        """Per row ``(sum(dy * (x - mean_in)), sum(dy))``, in one pass."""
        raise NotImplementedError

    def rows_grad_input(self, dy: Tensor, x3: Tensor, mean_in: Tensor,
                        a: Tensor, b: Tensor, k: Tensor) -> Tensor:
        """``dx = a * dy + b * (x - mean_in) + k`` per row."""
        raise NotImplementedError

    # -- the whole layer, with the per-(n, c) algebra inside (optional) -----
    def sn_normalize(self, x3: Tensor, mean_in: Tensor, var_in: Tensor,
                     weight: Optional[Tensor], bias: Optional[Tensor],
                     mean_share: Tensor, var_share: Tensor,
                     batch_mean: Optional[Tensor],
                     batch_var: Optional[Tensor], eps: float) -> Tensor:
        """Training output after :meth:`moments`: LN statistics pooled from
        the IN ones, mixed mean and variance, ``y = (x - mean) *
        rsqrt(var + eps) * gamma + beta``."""
        raise NotImplementedError

    def sn_forward_fixed(self, x3: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], mean_share: Tensor,
                         var_share: Tensor, batch_mean: Optional[Tensor],
                         batch_var: Optional[Tensor], eps: float,
                         correction: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The whole forward when the BN statistics do not depend on this
        batch (running statistics, or none): ``(y, mean_in, var_in)``,
        ideally in one sweep over x."""
        raise NotImplementedError

    def sn_backward(self, dy: Tensor, x3: Tensor, mean_in: Tensor,
                    var_in: Tensor, weight: Optional[Tensor],
                    mean_share: Tensor, var_share: Tensor,
                    batch_mean: Optional[Tensor], batch_var: Optional[Tensor],
                    pooled_bn: bool, eps: float, correction: int,
                    need_dx: bool):
        """Gradients ``(dx, d_gamma, d_beta, d_mean_share, d_var_share)``.

        ``pooled_bn``: the BN statistics are this batch's, pooled from the
        IN ones over n (their gradient flows into dx); otherwise they are
        constants. ``dx`` is an empty tensor when ``need_dx`` is False.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'
