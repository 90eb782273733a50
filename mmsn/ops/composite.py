"""The composite path: SN as plain differentiable PyTorch ops.

The reference the fast paths are tested against, the path that tracing,
``torch.compile`` (inductor fuses it) and the exporters record, and the one
that gives second-order gradients (``MMSN_SN_PATH=composite``).
"""
import torch
from torch import Tensor

from .statistics import batch_stats_of, mix_with_shares


def composite_norm(x3: Tensor, weight, bias, mean_share, var_share,
                   batch_stats_fn, eps: float, correction: int) -> Tensor:
    """SN of a (N, C, L) float32/float64 tensor; the arguments are those of
    :func:`mmsn.ops.mixed_norm`."""
    var_in, mean_in = torch.var_mean(x3, dim=2, correction=correction)
    mean, var = mix_with_shares(mean_in, var_in, mean_share.to(mean_in.dtype),
                                var_share.to(mean_in.dtype),
                                batch_stats_of(batch_stats_fn, mean_in,
                                               var_in))
    # y = (x - mean_in) * scale + shift: centering on the instance mean keeps
    # the gamma and importance gradients free of the cancellation that
    # sum(dy * x) suffers for inputs with a large mean
    if weight is None:
        scale = torch.rsqrt(var + eps)
    else:
        # not rsqrt * weight: ONNX Runtime (1.32) rewrites the exported
        # Div(1, Sqrt) * weight wrongly ("is not a graph input") when the
        # exporter merged weight with an equal initializer (a fresh layer's
        # weight equals its running_var)
        scale = weight.to(var.dtype) / torch.sqrt(var + eps)
    shift = (mean_in - mean) * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return torch.addcmul(
        shift.unsqueeze(-1), x3 - mean_in.unsqueeze(-1), scale.unsqueeze(-1))
