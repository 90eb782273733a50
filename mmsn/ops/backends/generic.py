"""Device-agnostic PyTorch ops: any device (``var_mean`` is a fast single
pass on GPUs) and any dense layout, channels_last included, without a copy.
"""
import torch

from ..statistics import serial_small_ops
from .base import RowBackend


def rows_grad_sums_by_batch_norm(dy, x3, mean_in):
    """Per row ``(sum(dy * (x - mean_in)), sum(dy))``: BatchNorm's backward
    on the (1, N*C, L) view (no copy for contiguous and channels_last rows)
    returns exactly these as its weight and bias gradients, in one fused
    pass."""
    n, c, length = x3.shape
    rows = n * c
    with serial_small_ops(rows, x3.device):
        ones = torch.ones(rows, dtype=x3.dtype, device=x3.device)
    _, dot, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy.reshape(1, rows, length), x3.reshape(1, rows, length), None, None,
        None, mean_in.reshape(rows), ones, True, 0.0, [False, True, True])
    return dot.view(n, c), sum_dy.view(n, c)


class GenericBackend(RowBackend):
    """Float32/float64 tensors on any device, contiguous or strided."""

    name = 'generic'
    takes_strided = True

    def moments(self, x3, correction):
        var_in, mean_in = torch.var_mean(x3, dim=2, correction=correction)
        return mean_in, var_in, None

    # Both maps act on x - mean_in (as the compiled kernels do): folding
    # the mean into the constant (x * scale - mean_in * scale) would cancel
    # at the scale of the mean, losing a large-mean input's deviations (and
    # a constant input's exact zero).
    def rows_affine(self, x3, scratch, mean_in, scale, shift):
        y = torch.sub(x3, mean_in.unsqueeze(-1), out=torch.empty_like(x3))
        return y.mul_(scale.unsqueeze(-1)).add_(shift.unsqueeze(-1))

    def rows_grad_sums(self, dy, x3, mean_in):
        return rows_grad_sums_by_batch_norm(dy, x3, mean_in)

    def rows_grad_input(self, dy, x3, mean_in, a, b, k):
        dx = torch.sub(x3, mean_in.unsqueeze(-1), out=torch.empty_like(x3))
        dx.mul_(b.unsqueeze(-1)).add_(k.unsqueeze(-1))
        return dx.addcmul_(dy, a.unsqueeze(-1))
