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
        batch = _batch_stats(state, batch_stats_fn, mean_in, var_in,
                             need_x_grad)
        # the fused methods cannot take the gradient of a batch graph
        state.fused = backend.fused and state.batch_graph is None
        if state.fused:
            y = backend.sn_normalize(xf, mean_in, var_in, weight, bias,
                                     *shares, *(batch or (None, None)), eps)
        else:
            with serial_small_ops(mean_in.numel(), xf.device):
                w, u = shares[0].unbind(), shares[1].unbind()
                ln = layer_stats_from_instance(mean_in, var_in)
                *_, scale, shift = small_forward(mean_in, var_in, weight,
                                                 bias, w, u, ln, batch, eps)
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
        backend = ctx.backend
        needs = ctx.needs_input_grad[:5]
        xf = backend.prepare(x3)
        dy = backend.prepare_grad(grad_y, xf)
        if ctx.fused:
            grads = list(backend.sn_backward(
                dy, xf, mean_in, var_in, ctx.weight, *ctx.shares,
                *(ctx.batch or (None, None)), ctx.pooled_bn, ctx.eps,
                ctx.correction, needs[0]))
            if not needs[0]:
                grads[0] = None
        else:
            dot, sum_dy = backend.rows_grad_sums(dy, xf, mean_in)
            w, u, ln = ctx.small
            with serial_small_ops(mean_in.numel(), xf.device):
                grads, dx_coefs = small_backward(
                    dot, sum_dy, mean_in, var_in, ctx.weight, w, u, ln,
                    ctx.batch, ctx.eps, needs, ctx.pooled_bn, xf.shape[2],
                    ctx.correction, _graph_grad(ctx.batch_graph))
            if needs[0]:
                grads[0] = backend.rows_grad_input(dy, xf, mean_in, *dx_coefs)
        if grads[0] is not None:
            grads[0] = grads[0].to(x3.dtype)
        for i, dtype in enumerate(ctx.param_dtypes, 1):
            if not needs[i]:
                grads[i] = None
            elif grads[i] is not None:
                grads[i] = grads[i].to(dtype)
        return (*grads, None, None, None, None)


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
