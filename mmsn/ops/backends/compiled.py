"""The compiled CPU kernels of ``mmsn._C`` (``torch.ops.mmsn``): one pass
over the big tensor each, and the whole layer with the per-(n, c) algebra
computed in double inside the passes (``fused``)."""
from .base import RowBackend


class CompiledBackend(RowBackend):
    """Contiguous float32/float64 CPU tensors.

    Args:
        ops: The ``torch.ops.mmsn`` namespace, from
            :func:`mmsn.ops._extension.load_compiled_ops`.
    """

    name = 'compiled'
    fused = True

    def __init__(self, ops) -> None:
        self._ops = ops

    @property
    def ops(self):
        """The ``torch.ops.mmsn`` namespace."""
        return self._ops

    def moments(self, x3, correction):
        mean_in, var_in = self._ops.instance_moments(x3, correction)
        return mean_in, var_in, None

    def rows_affine(self, x3, scratch, mean_in, scale, shift):
        return self._ops.rows_affine(x3, mean_in, scale.contiguous(),
                                     shift.contiguous())

    def rows_grad_sums(self, dy, x3, mean_in):
        return self._ops.rows_grad_sums(dy, x3, mean_in)

    def rows_grad_input(self, dy, x3, mean_in, a, b, k):
        return self._ops.rows_grad_input(dy, x3, mean_in, a.contiguous(),
                                         b.contiguous(), k.contiguous())

    def sn_normalize(self, x3, mean_in, var_in, weight, bias, mean_share,
                     var_share, batch_mean, batch_var, eps):
        return self._ops.sn_affine(x3, mean_in, var_in, weight, bias,
                                   mean_share, var_share, batch_mean,
                                   batch_var, eps)

    def sn_forward_fixed(self, x3, weight, bias, mean_share, var_share,
                         batch_mean, batch_var, eps, correction):
        return self._ops.sn_forward_fixed(x3, weight, bias, mean_share,
                                          var_share, batch_mean, batch_var,
                                          eps, correction)

    def sn_backward(self, dy, x3, mean_in, var_in, weight, mean_share,
                    var_share, batch_mean, batch_var, pooled_bn, eps,
                    correction, need_dx):
        return self._ops.sn_backward(dy, x3, mean_in, var_in, weight,
                                     mean_share, var_share, batch_mean,
                                     batch_var, pooled_bn, eps, correction,
                                     need_dx)
