"""Kernels of SN's layer operators (``torch.ops.mmsn.switchable_norm_*``)
for tensors that mmsn._C has no kernel for (CUDA, other devices), over one
backend's passes (:mod:`.backends`): the bodies of :mod:`.function`, with
the running statistics moved on the device (:func:`.statistics.
update_running_stats_`) and the softmax of the importance logits inside.

Each function takes the operator's arguments (see csrc/library.cpp) after
the backend; :mod:`.library` registers them, with the backend chosen once
per device. A backend may implement a whole pass itself (``layer_train``,
``layer_eval``, ``layer_backward``: fewer kernel launches) and is then
handed the same arguments.
"""
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import RowBackend
from .backends.base import is_dense, like_input
from .function import _forward, backward_passes, backward_state
from .statistics import (NONFINITE_EVAL, PooledBatchStats,
                         batch_stats_from_instance, in_var_correction,
                         nonfinite_slot, stats_dtype, update_running_stats_)


def _rows(backend: RowBackend, x: Tensor) -> Tensor:
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    if backend.takes_strided and x3.dtype in backend.input_dtypes:
        return x3 if is_dense(x3) else x3.contiguous()
    return x3.contiguous()


def _shares(mean_weight: Tensor, var_weight: Tensor, softmax: bool,
            dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    shares = (mean_weight.detach().to(dtype), var_weight.detach().to(dtype))
    if softmax:
        shares = tuple(torch.softmax(s, 0) for s in shares)
    return shares


def _softmax_backward(share: Tensor, grad: Tensor) -> Tensor:
    return share * (grad - (share * grad).sum())


def train(backend: RowBackend, x, weight, bias, mean_weight, var_weight,
          running_mean, running_var, num_batches_tracked, nonfinite,
          softmax: bool, momentum: Optional[float], moving_average: bool,
          eps: float, unbiased: bool, update_stats: bool):
    """``switchable_norm_train``: ``(y, mean_in, var_in)``."""
    if hasattr(backend, 'layer_train'):
        return backend.layer_train(
            x, weight, bias, mean_weight, var_weight, running_mean,
            running_var, num_batches_tracked, nonfinite, softmax, momentum,
            moving_average, eps, unbiased, update_stats)
    x3 = _rows(backend, x)
    dtype = stats_dtype(x.dtype)

    def move_running_stats(mean_bn, var_bn, mean_in):
        update_running_stats_(running_mean, running_var, num_batches_tracked,
                              nonfinite, mean_bn, var_bn,
                              nonfinite_slot(mean_in), momentum,
                              moving_average)

    observer = move_running_stats
    if running_mean is None or not update_stats:
        observer = None

    batch_fn = PooledBatchStats(observer) if mean_weight.numel() == 3 \
        else None
    y3, mean_in, var_in = _forward(
        SimpleNamespace(), backend, x3, weight, bias,
        *_shares(mean_weight, var_weight, softmax, dtype), batch_fn, eps,
        in_var_correction(x3.shape[2], unbiased), False)
    return like_input(y3, x), mean_in, var_in


def evaluate(backend: RowBackend, x, weight, bias, mean_weight, var_weight,
             running_mean, running_var, nonfinite, softmax: bool, eps: float,
             unbiased: bool):
    """``switchable_norm_eval``: ``(y, mean_in, var_in)``."""
    if hasattr(backend, 'layer_eval'):
        return backend.layer_eval(x, weight, bias, mean_weight, var_weight,
                                  running_mean, running_var, nonfinite,
                                  softmax, eps, unbiased)
    x3 = _rows(backend, x)
    dtype = stats_dtype(x.dtype)
    fixed = None if mean_weight.numel() == 2 else (running_mean, running_var)
    y3, mean_in, var_in = _forward(
        SimpleNamespace(), backend, x3, weight, bias,
        *_shares(mean_weight, var_weight, softmax, dtype), fixed, eps,
        in_var_correction(x3.shape[2], unbiased), False)
    if nonfinite is not None:
        bad = ~(torch.isfinite(mean_in).all() & torch.isfinite(var_in).all())
        nonfinite[NONFINITE_EVAL] += bad.to(nonfinite.dtype)
    return like_input(y3, x), mean_in, var_in


def backward(backend: RowBackend, grad_y, x, mean_in, var_in, weight,
             mean_weight, var_weight, running_mean, running_var,
             softmax: bool, batch_stats: bool, eps: float, unbiased: bool,
             need_dx: bool):
    """``switchable_norm_backward``: gradients of (x, weight, bias,
    mean_weight, var_weight); dx is empty unless ``need_dx``."""
    if hasattr(backend, 'layer_backward'):
        return backend.layer_backward(grad_y, x, mean_in, var_in, weight,
                                      mean_weight, var_weight, running_mean,
                                      running_var, softmax, batch_stats, eps,
                                      unbiased, need_dx)
    x3 = _rows(backend, x)
    dtype = mean_in.dtype
    shares = _shares(mean_weight, var_weight, softmax, dtype)
    batch, pooled = None, False
    if mean_weight.numel() == 3:
        if batch_stats:
            batch = batch_stats_from_instance(mean_in.double(),
                                              var_in.double())
            pooled = True
        else:
            batch = (running_mean.to(dtype), running_var.to(dtype))
    param = None if weight is None else weight.detach().to(dtype)
    state = backward_state(backend, mean_in, param, shares, batch, pooled,
                           eps, in_var_correction(x3.shape[2], unbiased))
    grad_y3 = grad_y.reshape(x3.shape)
    grads = backward_passes(state, backend, x3, mean_in, var_in, grad_y3,
                            (need_dx, True, True, True, True))
    if softmax:
        grads[3] = _softmax_backward(shares[0], grads[3])
        grads[4] = _softmax_backward(shares[1], grads[4])
    dx = like_input(grads[0], x) if need_dx else x.new_empty(0)
    like = weight if weight is not None else mean_in
    c = x.shape[1]
    d_weight = grads[1] if grads[1] is not None else mean_in.new_zeros(c)
    d_bias = grads[2] if grads[2] is not None else mean_in.new_zeros(c)
    return (dx, d_weight.to(like.dtype), d_bias.to(like.dtype),
            grads[3].to(mean_weight.dtype), grads[4].to(var_weight.dtype))


__all__ = ['train', 'evaluate', 'backward']
