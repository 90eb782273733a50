"""SN's and SSN's layer operators in ``torch.ops.mmsn``: one operator per
pass of a layer, so that a layer call costs the host what a BatchNorm call
does (one dispatched operator forward, one backward, no host sync).

* ``switchable_norm_train``: the training forward; also moves the running
  statistics (or counts a non-finite batch) on the device;
* ``switchable_norm_eval``: the forward with the running statistics;
* ``switchable_norm_backward``: the gradients of both;
* ``sparsestmax_shares`` (+ ``_backward``) and ``sparsestmax_freeze_``:
  SSN's shares and the freezing of one-hot ones;
* ``sparse_switchable_norm_train`` and ``_eval``: SSN's forwards in one
  call each (the shares, in training the freeze, and SN's operator with
  the shares: one graph node).

mmsn._C declares them (``csrc/library.cpp``), with their CPU kernels and,
for every device, their autograd formulas in C++. This module adds what is
registered from Python: the shapes torch.compile traces with (fake
kernels), and the kernels of other devices over the backends
(:mod:`.layer_kernels`): Triton on CUDA (the generic PyTorch ops for
float64 or without Triton), the generic ops on any other device; each
chosen once, at registration.

Without mmsn._C (no compiler) there are no layer operators: the layers run
the functional core (:mod:`.switchable_norm`), with the same numbers and
more host work.
"""
import functools
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import backends, layer_kernels
from .sparsestmax import (freeze_one_hot_, one_hot_argmax,
                          sparsestmax_jacobian)
from .statistics import stats_dtype

_LIB: Optional[torch.library.Library] = None


_NAMES = ('switchable_norm_train', 'switchable_norm_eval',
          'switchable_norm_backward', 'sparsestmax_shares',
          'sparsestmax_shares_backward', 'sparsestmax_freeze_',
          'sparse_switchable_norm_train', 'sparse_switchable_norm_eval')


# the operators once registered (a constant to torch.compile's tracer)
_LAYER_OPS: Optional[SimpleNamespace] = None


def layer_ops() -> Optional[SimpleNamespace]:
    """The layer operators (``OpOverload`` s, by name without the
    namespace), or None when mmsn._C is not available. The first call
    loads (perhaps compiles) mmsn._C and registers the Python kernels."""
    if _LAYER_OPS is not None:
        return _LAYER_OPS
    ops = backends.compiled_ops()
    if ops is None:
        return None
    return _registered(ops)


def loaded_layer_ops() -> Optional[SimpleNamespace]:
    """The layer operators if :func:`layer_ops` has loaded them, else None
    (without loading anything: what torch.compile's tracer may read)."""
    return _LAYER_OPS


def _registered(ops) -> Optional[SimpleNamespace]:
    global _LAYER_OPS
    if not hasattr(ops, 'switchable_norm_train'):
        return None
    if _LIB is None:
        _register()
    _LAYER_OPS = SimpleNamespace(
        **{n: getattr(ops, n).default for n in _NAMES})
    return _LAYER_OPS


# -- shapes for torch.compile and the meta device -------------------------
def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=stats_dtype(x.dtype))


def _forward_fake(x, *args):
    """The four layer forwards (SN's and SSN's, training and eval): y like
    x, and the IN statistics."""
    return torch.empty_like(x), _stats_like(x), _stats_like(x)


def _backward_fake(grad_y, x, mean_in, var_in, weight, mean_weight,
                   var_weight, running_mean, running_var, softmax,
                   batch_stats, eps, unbiased, need_dx):
    param = weight if weight is not None else mean_in
    c = x.shape[1]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            param.new_empty(c), param.new_empty(c),
            torch.empty_like(mean_weight), torch.empty_like(var_weight))


def _shares_fake(mean_weight, var_weight, radius, mean_fixed, var_fixed):
    k = mean_weight.shape[0]
    return (torch.empty_like(mean_weight), torch.empty_like(var_weight),
            mean_weight.new_empty(2, k, k))


def _shares_backward_fake(grad_mean_share, grad_var_share, jacobian):
    k = jacobian.shape[-1]
    return jacobian.new_empty(k), jacobian.new_empty(k)


def _freeze_fake(mean_weight, var_weight, mean_fixed, var_fixed, mean_grad,
                 var_grad, mean_share, var_share):
    return None


# -- SSN's shares on devices without C++ kernels ----------------------------
def _shares_kernel(mean_weight, var_weight, radius, mean_fixed, var_fixed):
    logits = torch.stack([mean_weight, var_weight]).detach()
    fixed = torch.stack([mean_fixed, var_fixed]).bool()
    shares, jacobian = sparsestmax_jacobian(logits, radius.to(logits.dtype))
    stored = one_hot_argmax(logits)
    shares = torch.where(fixed, stored, shares)
    jacobian = torch.where(fixed.unsqueeze(-1), 0., jacobian)
    return shares[0].clone(), shares[1].clone(), jacobian


def _shares_backward_kernel(grad_mean_share, grad_var_share, jacobian):
    grads = torch.stack([grad_mean_share, grad_var_share]).to(jacobian.dtype)
    out = torch.einsum('vi,vij->vj', grads, jacobian)
    return out[0].clone(), out[1].clone()


def _freeze_kernel(mean_weight, var_weight, mean_fixed, var_fixed, mean_grad,
                   var_grad, mean_share, var_share):
    freeze_one_hot_(mean_weight, mean_fixed, mean_grad, mean_share)
    freeze_one_hot_(var_weight, var_fixed, var_grad, var_share)


def _with_backend(kernel, backend_for):
    @functools.wraps(kernel)
    def run(first, *args):
        # the first tensor argument decides (x, or grad_y and x)
        x = args[0] if kernel is layer_kernels.backward else first
        return kernel(backend_for(x), first, *args)

    return run


_GENERIC = backends.GenericBackend()


@functools.lru_cache(maxsize=None)
def _triton() -> Optional[backends.RowBackend]:
    return backends.triton_backend()


def _cuda_backend(x: Tensor) -> backends.RowBackend:
    # Triton's kernels are float32 (half precision inside): never float64
    if x.dtype == torch.float64 or _triton() is None:
        return _GENERIC
    return _triton()


def _generic_backend(x: Tensor) -> backends.RowBackend:
    return _GENERIC


def _register() -> None:
    global _LIB
    _LIB = torch.library.Library('mmsn', 'IMPL')  # noqa: TOR901
    fakes = dict(switchable_norm_train=_forward_fake,
                 switchable_norm_eval=_forward_fake,
                 switchable_norm_backward=_backward_fake,
                 sparsestmax_shares=_shares_fake,
                 sparsestmax_shares_backward=_shares_backward_fake,
                 sparsestmax_freeze_=_freeze_fake,
                 sparse_switchable_norm_train=_forward_fake,
                 sparse_switchable_norm_eval=_forward_fake)
    for name, fake in fakes.items():
        torch.library.register_fake(f'mmsn::{name}', fake, lib=_LIB)
    layer = dict(switchable_norm_train=layer_kernels.train,
                 switchable_norm_eval=layer_kernels.evaluate,
                 switchable_norm_backward=layer_kernels.backward)
    for name, kernel in layer.items():
        _LIB.impl(name, _with_backend(kernel, _cuda_backend), 'CUDA')
        _LIB.impl(name, _with_backend(kernel, _generic_backend),
                  'CompositeExplicitAutograd')
    ssn = dict(sparsestmax_shares=_shares_kernel,
               sparsestmax_shares_backward=_shares_backward_kernel,
               sparsestmax_freeze_=_freeze_kernel)
    for name, kernel in ssn.items():
        _LIB.impl(name, kernel, 'CUDA')
        _LIB.impl(name, kernel, 'CompositeExplicitAutograd')


__all__ = ['layer_ops']
