"""SN over a backend's passes: the autograd Function and its no-grad call,
which share one forward body.

Forward: the moments pass, the per-(n, c) algebra, the output pass (or the
backend's fused whole-layer methods). Only the input and the IN moments are
kept for backward. Backward: per-row ``sum(dy)`` and ``sum(dy * (x -
mean_in))`` (one pass), the gradient of the small algebra in closed form,
then ``dx = a * dy + b * (x - mean_in) + k`` (one pass). Only a
``batch_stats_fn`` other than the default pooling (SyncSN's all-reduce) is
differentiated by autograd. The backward is not differentiable again: for
second-order gradients use the composite path.
"""
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

from .backends import RowBackend
from .statistics import (PooledBatchStats, batch_stats_of, fixed_stats,
                         is_default_pooling, layer_stats_from_instance,
                         serial_small_ops, small_backward, small_forward,
                         stats_dtype)


def _param(t, dtype):
    return None if t is None else t.detach().to(dtype)


def _batch_stats(state, batch_stats_fn, mean_in, var_in, need_x_grad):
    """The BN statistics to mix, detached, recording in ``state`` how their
    gradient reaches the IN statistics: in closed form for the default
    pooling (``pooled_bn``), through their own graph otherwise
    (``batch_graph``: SyncSN's all-reduce), none for fixed statistics."""
    with serial_small_ops(mean_in.numel(), mean_in.device):
        if isinstance(batch_stats_fn, PooledBatchStats):
            # the default: its gradient is written out, no graph needed
            state.pooled_bn = need_x_grad
            return batch_stats_fn.pooled(mean_in, var_in)
        leaves = None
        if need_x_grad and callable(batch_stats_fn):
            with torch.enable_grad():
                leaves = (mean_in.detach().requires_grad_(),
                          var_in.detach().requires_grad_())
                graph = batch_stats_fn(*leaves)
        else:
            graph = batch_stats_of(batch_stats_fn, mean_in, var_in)
    if graph is None:
        return None
    batch = tuple(t.detach() for t in graph)
    if leaves is not None and any(t.requires_grad for t in graph):
        if is_default_pooling(graph):
            state.pooled_bn = True
        else:
            state.batch_graph = (graph, leaves)
    return batch


def _forward(state, backend: RowBackend, x3, weight, bias, mean_share,
             var_share, batch_stats_fn, eps, correction, need_x_grad):
    """``(y, mean_in, var_in)``; what backward needs goes into ``state``
    (the autograd context, or a throwaway namespace without gradients)."""
    xf = backend.prepare(x3)
    dtype = stats_dtype(xf.dtype)
    weight, bias = _param(weight, dtype), _param(bias, dtype)
    shares = (_param(mean_share, dtype), _param(var_share, dtype))
    state.pooled_bn, state.batch_graph = False, None
    state.fused = backend.fused
    if backend.fused and not callable(batch_stats_fn):
        # one sweep: the BN statistics do not depend on this batch
        batch = fixed_stats(batch_stats_fn, dtype)
        y, mean_in, var_in = backend.sn_forward_fixed(
            xf, weight, bias, *shares, *(batch or (None, None)), eps,
            correction)
    else:
        mean_in, var_in, scratch = backend.moments(xf, correction)
        # the per-(n, c) algebra in double, as the compiled kernels do:
        # pooled and mixed statistics keep the precision of the moments
        batch = _batch_stats(state, batch_stats_fn, mean_in.double(),
                             var_in.double(), need_x_grad)
        # the fused methods cannot take the gradient of a batch graph
        state.fused = backend.fused and state.batch_graph is None
        if state.fused:
            y = backend.sn_normalize(xf, mean_in, var_in, weight, bias,
                                     *shares,
                                     *(fixed_stats(batch, dtype)
                                       or (None, None)), eps)
        else:
            with serial_small_ops(mean_in.numel(), xf.device):
                mean64, var64 = mean_in.double(), var_in.double()
                w, u = (s.double().unbind() for s in shares)
                ln = layer_stats_from_instance(mean64, var64)
                *_, scale, shift = small_forward(
                    mean64, var64, _param(weight, torch.float64),
                    _param(bias, torch.float64), w, u, ln, batch, eps)
                scale, shift = scale.to(dtype), shift.to(dtype)
            y = backend.rows_affine(xf, scratch, mean_in, scale, shift)
            state.small = (w, u, ln)
    state.batch, state.weight, state.shares = batch, weight, shares
    return y, mean_in, var_in


class FusedSwitchableNorm(torch.autograd.Function):
    """SN of a (N, C, L) tensor over ``backend``'s passes, saving only the
    input and the IN moments. Arguments: see :func:`fused_norm`."""

    @staticmethod
    def forward(ctx, x3, weight, bias, mean_share, var_share, batch_stats_fn,
                eps, correction, backend):
        y, mean_in, var_in = _forward(ctx, backend, x3, weight, bias,
                                      mean_share, var_share, batch_stats_fn,
                                      eps, correction,
                                      ctx.needs_input_grad[0])
        ctx.save_for_backward(x3, mean_in, var_in)
        ctx.backend, ctx.eps, ctx.correction = backend, eps, correction
        ctx.param_dtypes = [
            None if t is None else t.dtype
            for t in (weight, bias, mean_share, var_share)
        ]
        return y.to(x3.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x3, mean_in, var_in = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        grads = backward_passes(ctx, ctx.backend, x3, mean_in, var_in,
                                grad_y, needs)
        if grads[0] is not None:
            grads[0] = grads[0].to(x3.dtype)
        for i, dtype in enumerate(ctx.param_dtypes, 1):
            if not needs[i]:
                grads[i] = None
            elif grads[i] is not None:
                grads[i] = grads[i].to(dtype)
        return (*grads, None, None, None, None)


def backward_state(backend: RowBackend, mean_in, weight, shares, batch,
                   pooled_bn: bool, eps: float, correction: int):
    """What :func:`backward_passes` needs, rebuilt from the forward's
    inputs (for a backward that did not run the forward in this process's
    autograd graph: the layer operators' kernels)."""
    state = SimpleNamespace(backend=backend, eps=eps, correction=correction,
                            fused=backend.fused, batch=batch, weight=weight,
                            shares=shares, pooled_bn=pooled_bn,
                            batch_graph=None)
    if not state.fused:
        state.small = (shares[0].double().unbind(),
                       shares[1].double().unbind(), None)
    return state


def backward_passes(state, backend: RowBackend, x3, mean_in, var_in, grad_y,
                    needs):
    """Gradients ``[dx, d_gamma, d_beta, d_mean_share, d_var_share]``: dx in
    the prepared input's dtype, the others in the statistics' dtype or
    float64 (None where ``needs`` says none is needed, except that the
    fused kernels give all parameter gradients)."""
    xf = backend.prepare(x3)
    dy = backend.prepare_grad(grad_y, xf)
    if state.fused:
        grads = list(backend.sn_backward(
            dy, xf, mean_in, var_in, state.weight, *state.shares,
            *(fixed_stats(state.batch, mean_in.dtype) or (None, None)),
            state.pooled_bn, state.eps, state.correction, needs[0]))
        if not needs[0]:
            grads[0] = None
        return grads
    dot, sum_dy = backend.rows_grad_sums(dy, xf, mean_in)
    w, u, ln = state.small
    with serial_small_ops(mean_in.numel(), xf.device):
        mean64, var64 = mean_in.double(), var_in.double()
        if ln is None:
            ln = layer_stats_from_instance(mean64, var64)
        grads, dx_coefs = small_backward(
            dot.double(), sum_dy.double(), mean64, var64,
            _param(state.weight, torch.float64), w, u, ln,
            fixed_stats(state.batch, torch.float64), state.eps, needs,
            state.pooled_bn, xf.shape[2], state.correction,
            _graph_grad(state.batch_graph))
        if needs[0]:
            dx_coefs = tuple(c.to(xf.dtype) for c in dx_coefs)
    if needs[0]:
        grads[0] = backend.rows_grad_input(dy, xf, mean_in, *dx_coefs)
    return grads


def _graph_grad(batch_graph):
    """Gradients of (mean_in, var_in) through batch statistics with a graph
    of their own, given those of (mean_bn, var_bn); None without one."""
    if batch_graph is None:
        return None
    (mean_bn, var_bn), leaves = batch_graph

    def grad(grad_mean_bn, grad_var_bn):
        outs, outs_grads = [], []
        for t, g in ((mean_bn, grad_mean_bn), (var_bn, grad_var_bn)):
            if t.requires_grad:
                outs.append(t)
                outs_grads.append(g.to(t.dtype))
        return torch.autograd.grad(outs, leaves, outs_grads,
                                   retain_graph=True, allow_unused=True)

    return grad


def fused_norm(x3, weight, bias, mean_share, var_share, batch_stats_fn, eps,
               correction, backend: RowBackend, needs_grad: bool):
    """SN of a (N, C, L) tensor laid out as ``backend`` takes it (see
    :func:`mmsn.ops.mixed_norm` for the other arguments); through the
    autograd Function when ``needs_grad``, else the same forward without
    recording anything."""
    if needs_grad:
        return FusedSwitchableNorm.apply(x3, weight, bias, mean_share,
                                         var_share, batch_stats_fn, eps,
                                         correction, backend)
    y = _forward(SimpleNamespace(), backend, x3, weight, bias, mean_share,
                 var_share, batch_stats_fn, eps, correction, False)[0]
    return y.to(x3.dtype)
