"""The per-(n, c) statistics of SN and their gradients, on O(N * C) numbers.

Device-independent algebra between the passes over the big tensor:

* IN statistics per (n, c) come from a backend's moments pass;
* LN and BN statistics are pooled from them (mean of means, mean of
  ``var_in + (mean_in - mean)^2``, which equals the authors' mean of second
  moments minus the squared mean without its float32 cancellation);
* ``mean = sum_k w_k * mean_k`` (likewise the variance) with importance
  shares ``w`` on the simplex, order [IN, LN, BN];
* the closed-form gradient of all of it, given the two per-row sums of the
  backward (:func:`small_backward`).
"""
import contextlib
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ._capture import capturing_graph

# Given (mean_in, var_in) of shape (N, C), returns (mean_bn, var_bn) of shape
# (C,), or None when the layer has no BN branch.
BatchStatsFn = Callable[[Tensor, Tensor], Optional[Tuple[Tensor, Tensor]]]
# What the entry points take: that function, fixed (mean, var) statistics of
# shape (C,) (running statistics), or None (no BN branch).
BatchStats = Union[BatchStatsFn, Tuple[Tensor, Tensor], None]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_var_correction(num_positions: int, unbiased: bool) -> int:
    """Bessel correction for the IN variance.

    A single position has no unbiased variance (the authors' layer returns NaN
    there); its variance is 0 by any definition, so the biased estimate is
    used.
    """
    return 1 if unbiased and num_positions > 1 else 0


def fixed_stats(batch_stats, dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """Fixed BN statistics (or None) in the statistics' dtype."""
    if batch_stats is None:
        return None
    return tuple(t.to(dtype) for t in batch_stats)


def batch_stats_of(batch_stats: BatchStats, mean_in: Tensor,
                   var_in: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """The BN statistics to mix, in the dtype of the IN ones."""
    if callable(batch_stats):
        return batch_stats(mean_in, var_in)
    return fixed_stats(batch_stats, mean_in.dtype)


# at::internal::GRAIN_SIZE: CPU ops on fewer elements run on one thread.
_GRAIN_SIZE = 32768


@contextlib.contextmanager
def serial_small_ops(numel: int, device: torch.device):
    """Run the per-(n, c) algebra (dozens of small ops) on one thread.

    With N*C >= 32768 each of these ops would open an OpenMP parallel region;
    a region costs microseconds on an idle machine but up to a scheduler
    time slice (milliseconds) on a busy one, for no gain on so little data.
    """
    threads = torch.get_num_threads()
    if device.type != 'cpu' or numel < _GRAIN_SIZE or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# Pooled LN / BN statistics
# ---------------------------------------------------------------------------
def _pooled_stats(mean_in: Tensor, var_in: Tensor,
                  dim: int) -> Tuple[Tensor, Tensor]:
    mean = mean_in.mean(dim, keepdim=True)
    var = (var_in + (mean_in - mean).square()).mean(dim, keepdim=True)
    return mean, var


class BatchStatsFromInstance(torch.autograd.Function):
    """:func:`batch_stats_from_instance` with a closed-form backward that
    keeps only ``mean_in`` (already kept by SN), where autograd would keep
    another (N, C) intermediate."""

    @staticmethod
    def forward(ctx, mean_in, var_in):
        mean_bn, var_bn = _pooled_stats(mean_in, var_in, 0)
        ctx.save_for_backward(mean_in)
        return mean_bn.squeeze(0), var_bn.squeeze(0)

    @staticmethod
    def backward(ctx, grad_mean_bn, grad_var_bn):
        mean_in, = ctx.saved_tensors
        # recomputed from mean_in (not saved) so that a double backward sees
        # its dependence on mean_in
        mean_bn = mean_in.mean(0, keepdim=True)
        n = mean_in.shape[0]
        grad_mean_in = grad_var_in = None
        if grad_var_bn is not None:
            grad_var_bn = grad_var_bn / n
            grad_var_in = grad_var_bn.expand_as(mean_in)
            # the derivative through mean_bn vanishes: sum(mean_in - mean_bn)
            # over n is 0
            grad_mean_in = (mean_in - mean_bn) * (2 * grad_var_bn)
        if grad_mean_bn is not None:
            grad_mean_bn = (grad_mean_bn / n).expand_as(mean_in)
            grad_mean_in = grad_mean_bn if grad_mean_in is None \
                else grad_mean_in + grad_mean_bn
        return grad_mean_in, grad_var_in


def batch_stats_from_instance(mean_in: Tensor,
                              var_in: Tensor) -> Tuple[Tensor, Tensor]:
    """BN statistics per channel, pooled from the IN statistics over n.

    ``mean(var_in + (mean_in - mean_bn)^2)`` equals the authors'
    ``mean(var_in + mean_in^2) - mean_bn^2`` exactly in real arithmetic, and
    avoids its cancellation in float32 for inputs with a large mean.
    """
    if capturing_graph() or not (mean_in.requires_grad
                                 or var_in.requires_grad):
        mean_bn, var_bn = _pooled_stats(mean_in, var_in, 0)
        return mean_bn.squeeze(0), var_bn.squeeze(0)
    return BatchStatsFromInstance.apply(mean_in, var_in)


def is_default_pooling(batch_graph) -> bool:
    """Whether BN statistics come straight from
    :func:`batch_stats_from_instance` (whose gradient the fast path writes
    out instead of asking autograd)."""
    node = batch_graph[0].grad_fn
    return (type(node) is BatchStatsFromInstance._backward_cls
            and batch_graph[1].grad_fn is node)


class PooledBatchStats:
    """The default BN statistics as a ``batch_stats_fn``: this batch's,
    pooled from its IN statistics over n (:func:`batch_stats_from_instance`),
    handed (detached, with the IN means they came from) to ``observer`` once
    computed (a layer updates its running statistics there).

    Calling it is the generic route; the fast path recognises it and pools
    without building a graph, writing the gradient out in closed form.
    """
    __slots__ = ('observer', )

    def __init__(self,
                 observer: Optional[Callable[[Tensor, Tensor, Tensor],
                                             None]] = None) -> None:
        self.observer = observer

    def pooled(self, mean_in: Tensor, var_in: Tensor) -> Tuple[Tensor, Tensor]:
        """The statistics, detached, after notifying the observer."""
        mean_bn, var_bn = _pooled_stats(mean_in.detach(), var_in.detach(), 0)
        mean_bn, var_bn = mean_bn.squeeze(0), var_bn.squeeze(0)
        if self.observer is not None:
            self.observer(mean_bn, var_bn, mean_in.detach())
        return mean_bn, var_bn

    def __call__(self, mean_in: Tensor,
                 var_in: Tensor) -> Tuple[Tensor, Tensor]:
        mean_bn, var_bn = batch_stats_from_instance(mean_in, var_in)
        if self.observer is not None:
            self.observer(mean_bn.detach(), var_bn.detach(), mean_in.detach())
        return mean_bn, var_bn


# ---------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------
# Slots of a layer's ``nonfinite`` counter (int64, (4,)): training batches
# with NaN/Inf in the input; finite training batches whose statistics
# overflowed; eval forwards with non-finite statistics; SyncSN batches
# pooled non-finite from other processes (this one's input finite or empty).
NONFINITE_INPUT, OVERFLOWED, NONFINITE_EVAL, NONFINITE_POOLED = range(4)
NONFINITE_SLOTS = 4


@torch.no_grad()
def update_running_stats_(running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Tensor,
                          nonfinite: Optional[Tensor], mean_bn: Tensor,
                          var_bn: Tensor, slot_if_bad: Tensor,
                          momentum: Optional[float],
                          moving_average: bool) -> None:
    """Move the running statistics by one training batch's BN statistics,
    on their device: a batch with a non-finite statistic leaves them and
    ``num_batches_tracked`` as they are and counts in ``nonfinite`` at
    ``slot_if_bad`` (an int64 scalar tensor; a negative slot counts
    nowhere). Nothing is read back to the host, so this never waits for
    the device (the compiled CPU kernels and the Triton kernels apply the
    same rule).

    ``momentum``: ``running = (1 - m) running + m batch``; None is the
    cumulative average. ``moving_average=False`` pools every batch since the
    last reset (mean of the means, second moments averaged likewise).
    """
    good = torch.isfinite(mean_bn).all() & torch.isfinite(var_bn).all()
    num_batches_tracked.add_(good.to(num_batches_tracked.dtype))
    if nonfinite is not None:
        slots = torch.arange(NONFINITE_SLOTS, device=nonfinite.device)
        nonfinite.add_(((slots == slot_if_bad) & ~good).to(nonfinite.dtype))
    # in double, rounded once into the buffers (as the compiled kernels do)
    mean, var = running_mean.double(), running_var.double()
    mean_bn, var_bn = mean_bn.double(), var_bn.double()
    if moving_average and momentum is not None:
        factor = momentum
    else:
        factor = num_batches_tracked.clamp_min(1).double().reciprocal()
    new_mean = torch.lerp(mean, mean_bn, factor)
    if moving_average:
        new_var = torch.lerp(var, var_bn, factor)
    else:
        second = var + mean.square()
        new_var = (torch.lerp(second, var_bn + mean_bn.square(), factor)
                   - new_mean.square()).clamp_min_(0)
    running_mean.copy_(torch.where(good, new_mean, mean))
    running_var.copy_(torch.where(good, new_var, var))


def nonfinite_slot(mean_in: Tensor) -> Tensor:
    """Which ``nonfinite`` slot a non-finite batch counts in: its input had
    NaN/Inf (a non-finite IN mean) or its finite statistics overflowed."""
    return torch.where(torch.isfinite(mean_in).all(), OVERFLOWED,
                       NONFINITE_INPUT)


def layer_stats_from_instance(mean_in: Tensor,
                              var_in: Tensor) -> Tuple[Tensor, Tensor]:
    """LN statistics per sample, pooled from the IN statistics over c (in
    the same cancellation-free form as :func:`batch_stats_from_instance`)."""
    return _pooled_stats(mean_in, var_in, 1)


# ---------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------
def _mixed(stat_in, shares, stat_ln, stat_bn):
    """``sum_k share_k * stat_k`` with the value of ``stat_in + sum_{k>0}
    share_k (stat_k - stat_in)``: equal statistics (a constant input) give
    exactly that statistic, although float shares do not sum to exactly 1.
    The gradient is the plain sum's (the shares' gradient of the paper's
    formula); where a statistic is infinite (inf - inf) the plain sum's
    value stands too."""
    plain = shares[1] * stat_ln
    exact = stat_in + shares[1] * (stat_ln - stat_in)
    if stat_bn is not None:
        plain = plain + shares[2] * stat_bn
        exact = exact + shares[2] * (stat_bn - stat_in)
    plain = torch.addcmul(plain, shares[0], stat_in)
    correction = (exact - plain).detach()
    return plain + torch.where(torch.isnan(correction), 0., correction)


def mix(mean_in, var_in, w, u, ln, batch, eps):
    """Mixed mean and ``var + eps`` (N, C), given the importance shares
    ``w``/``u`` (unbound), the LN statistics (N, 1) and the BN ones (C,) or
    None. The one formula every path uses (differentiable by autograd)."""
    mean = _mixed(mean_in, w, ln[0], None if batch is None else batch[0])
    var = _mixed(var_in, u, ln[1], None if batch is None else batch[1])
    return mean, var + eps


def mix_with_shares(mean_in: Tensor, var_in: Tensor, mean_share: Tensor,
                    var_share: Tensor,
                    batch_stats: Optional[Tuple[Tensor, Tensor]],
                    ) -> Tuple[Tensor, Tensor]:
    """Mean and variance of shape (N, C) mixed with the given importance
    shares, order [IN, LN, BN]."""
    return mix(mean_in, var_in, mean_share.unbind(), var_share.unbind(),
               layer_stats_from_instance(mean_in, var_in), batch_stats, 0.0)


def mix_statistics(mean_in: Tensor, var_in: Tensor, mean_weight: Tensor,
                   var_weight: Tensor,
                   batch_stats: Optional[Tuple[Tensor, Tensor]],
                   ) -> Tuple[Tensor, Tensor]:
    """Softmax-weighted mean and variance of shape (N, C), order [IN, LN, BN].
    """
    return mix_with_shares(mean_in, var_in,
                           torch.softmax(mean_weight.to(mean_in.dtype), 0),
                           torch.softmax(var_weight.to(mean_in.dtype), 0),
                           batch_stats)


def small_forward(mean_in, var_in, weight, bias, w, u, ln, batch, eps):
    """Mixed mean, rstd and the per-row map ``y = (x - mean_in) * scale +
    shift`` (centering on the instance mean keeps the gamma and importance
    gradients free of the cancellation that ``sum(dy * x)`` suffers for
    inputs with a large mean)."""
    mean, var_eps = mix(mean_in, var_in, w, u, ln, batch, eps)
    rstd = torch.rsqrt(var_eps)
    scale = rstd if weight is None else rstd * weight
    shift = (mean_in - mean) * scale
    if bias is not None:
        shift += bias
    return mean, rstd, scale, shift


# ---------------------------------------------------------------------------
# Closed-form backward of the small algebra
# ---------------------------------------------------------------------------
def _share_grad(grad_mixed, row_sums, col_sums, stat_in, stat_ln, batch,
                index):
    """Gradient of the importance shares, given the gradient of
    ``sum_k share_k * stat_k`` (N, C) and its row/column sums."""
    # mul + sum rather than torch.dot: BLAS would thread a dot product of a
    # few thousand values
    if col_sums is None:
        return torch.stack([(grad_mixed * stat_in).sum(),
                            (row_sums * stat_ln).sum()])
    # Summed around the BN statistic and the common part added once: with a
    # large mean, the three sums would otherwise each round at the scale of
    # the mean, and the softmax's backward takes their differences (SyncSN,
    # whose per-process sums do not cancel as the joined batch's do).
    ref = batch[index]
    common = (col_sums * ref).sum()
    return torch.stack([(grad_mixed * (stat_in - ref)).sum(),
                        (grad_mixed * (stat_ln - ref)).sum(),
                        common.new_zeros(())]) + common


def small_backward(dot, sum_dy, mean_in, var_in, weight, w, u, ln, batch,
                   eps, needs, pooled_bn, length, correction,
                   batch_grad=None):
    """Gradients of SN from the per-row sums ``dot = sum(dy * (x -
    mean_in))`` and ``sum_dy`` (N, C).

    ``needs``: which of (x, gamma, beta, mean_share, var_share) need one.
    ``pooled_bn``: the BN statistics are this batch's default pooling (their
    gradient flows into the IN statistics here); ``batch_grad`` maps the
    gradients of other batch statistics (gm_col, gv_col) to those of
    (mean_in, var_in) when they have a graph of their own (SyncSN).

    Returns ``[None, d_gamma, d_beta, d_mean_share, d_var_share]`` (None
    where not needed) and the coefficients ``(a, b, k)`` of ``dx = a * dy +
    b * (x - mean_in) + k`` per row (None when x needs no gradient).
    """
    need_x, need_w, need_b, need_mw, need_vw = needs
    mean, rstd, scale, _ = small_forward(mean_in, var_in, weight, None, w, u,
                                         ln, batch, eps)
    # y = (x - mean) * scale + beta per row; gradients of the mixed mean
    # (negated) and variance:
    grad_centered = torch.addcmul(dot, mean_in - mean, sum_dy)
    neg_grad_mean = scale * sum_dy
    # d rsqrt(var + eps) / dvar = -rstd^3 / 2
    grad_var = grad_centered * (scale * rstd).mul_(rstd).mul_(-0.5)
    grads = [None] * 5
    if need_w:
        grads[1] = (grad_centered * rstd).sum(0)
    if need_b:
        grads[2] = sum_dy.sum(0)
    gm_row = neg_grad_mean.sum(1, keepdim=True)
    gv_row = grad_var.sum(1, keepdim=True)
    gm_col = gv_col = None
    if batch is not None:
        gm_col = neg_grad_mean.sum(0)
        gv_col = grad_var.sum(0)
    if need_mw:
        grads[3] = -_share_grad(neg_grad_mean, gm_row, gm_col, mean_in, ln[0],
                                batch, 0)
    if need_vw:
        grads[4] = _share_grad(grad_var, gv_row, gv_col, var_in, ln[1], batch,
                               1)
    if not need_x:
        return grads, None

    # through the IN statistics directly and through the pooled LN (and BN)
    # ones: mean_p = mean(mean_in), var_p = mean(var_in + (mean_in -
    # mean_p)^2) have d/dmean_in = (1 + 2 g_var (mean_in - mean_p)) / count
    # and d/dvar_in = 1 / count (the term through mean_p vanishes: mean_in -
    # mean_p sums to 0).
    n, c = mean_in.shape
    gv_ln = gv_row * (u[1] / c)
    neg_gm_small = gm_row * (w[1] / c)
    gv_small = gv_ln
    if pooled_bn:
        gv_bn = gv_col * (u[2] / n)
        neg_gm_small = neg_gm_small + gm_col * (w[2] / n)
        gv_small = gv_small + gv_bn
    grad_mean_in = torch.addcmul(neg_gm_small, w[0], neg_grad_mean).neg_()
    grad_mean_in.addcmul_(mean_in - ln[0], gv_ln, value=2)
    if pooled_bn:
        grad_mean_in.addcmul_(mean_in - batch[0], gv_bn, value=2)
    grad_var_in = torch.addcmul(gv_small, u[0], grad_var)
    if batch_grad is not None:
        g_m, g_v = batch_grad(gm_col * -w[2], gv_col * u[2])
        if g_m is not None:
            grad_mean_in += g_m
        if g_v is not None:
            grad_var_in += g_v
    # d var_in / dx = 2 (x - mean_in) / (L - correction), d mean_in / dx = 1/L
    coef_x = grad_var_in * (2.0 / (length - correction))
    return grads, (scale, coef_x, grad_mean_in / length)
