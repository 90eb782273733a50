"""PyTorch's own GroupNorm and BatchNorm kernels on views of the rows: the
CPU fallback when ``mmsn._C`` is not built. Several times faster than
``var_mean`` and broadcasting ``addcmul`` on the CPU, but with more passes
over the big tensor than the compiled kernels."""
import torch

from ..statistics import serial_small_ops
from .base import RowBackend
from .generic import GenericBackend, rows_grad_sums_by_batch_norm

_aten = torch.ops.aten

# Added to the variance inside GroupNorm's kernel when it is used to get the
# IN moments: keeps its rstd finite for constant rows (and a single
# position) without changing any variance above ~1e-23.
_TINY_VAR = 1e-30


def _ones_zeros(rows, like):
    with serial_small_ops(rows, like.device):
        return (torch.ones(rows, dtype=like.dtype, device=like.device),
                torch.zeros(rows, dtype=like.dtype, device=like.device))


class NativeBackend(RowBackend):
    """Contiguous float32/float64 tensors; the rows are treated as one
    sample of N*C channels (BatchNorm) or N*C groups (GroupNorm)."""

    name = 'native'

    def moments(self, x3, correction):
        """Also returns a scratch buffer holding ``(x - mean_in) * rstd``,
        which :meth:`rows_affine` turns into the output in place."""
        n, c, length = x3.shape
        # GroupNorm with one channel per group = InstanceNorm: one
        # vectorized Welford pass for the moments (no cancellation).
        buf, mean_in, rstd = _aten.native_group_norm(x3, None, None, n, c,
                                                     length, c, _TINY_VAR)
        with serial_small_ops(n * c, x3.device):
            var_in = rstd.pow(-2)
            if correction:
                var_in.mul_(length / (length - correction))
        return mean_in, var_in, (buf, rstd)

    def rows_affine(self, x3, scratch, mean_in, scale, shift):
        n, c, length = x3.shape
        buf, rstd = scratch
        rows = n * c
        buf1 = buf.view(1, rows, length)
        # buf = (x - mean_in) * rstd; BatchNorm's inference kernel on the
        # (1, N*C, L) view applies a per-row affine map, in place.
        with serial_small_ops(rows, buf.device):
            alpha = (scale / rstd).reshape(rows)
        ones, zeros = _ones_zeros(rows, buf)
        _aten.native_batch_norm.out(
            buf1, alpha, shift.reshape(rows), zeros, ones, False, 0.0, 0.0,
            out=buf1, save_mean=buf.new_empty(0),
            save_invstd=buf.new_empty(0))
        return buf

    def rows_grad_sums(self, dy, x3, mean_in):
        return rows_grad_sums_by_batch_norm(dy, x3, mean_in)

    def rows_grad_input(self, dy, x3, mean_in, a, b, k):
        # on x - mean_in, as GenericBackend: b * x - b * mean_in would cancel
        # at the scale of a large mean
        return GenericBackend.rows_grad_input(self, dy, x3, mean_in, a, b, k)
