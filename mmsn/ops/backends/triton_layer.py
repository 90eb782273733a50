"""Triton kernel of SN's forward after the moments: the mixing and the
output in one launch (used by :mod:`.triton`).

A program owns the tile of :func:`.triton_kernels._tile` (BLOCK_C
channels of one sample, a chunk of positions). It pools the LN statistics
of its sample and the BN statistics of its channels from the IN ones
(:mod:`.triton_stats`), mixes them, and writes ``y = (x - mean_in) *
scale + shift``. In training the programs of sample 0 (first split) store
their channels' BN statistics, and the last of them to finish moves the
running statistics (or counts a non-finite batch); in eval the programs of
channel block 0 flag a sample with non-finite statistics and the last of
them counts the call. Nothing is read back to the host.
"""
import triton
import triton.language as tl

from .triton_kernels import _tile, _tile_affine
from .triton_stats import (FLT_MAX, arrive, branch_stats, layer_stats,
                           load_shares, mixed)

# slots of a layer's ``nonfinite`` counter (mmsn.ops.statistics)
_NONFINITE_INPUT = tl.constexpr(0)
_OVERFLOWED = tl.constexpr(1)
_NONFINITE_EVAL = tl.constexpr(2)


@triton.jit
def _update_running(bn_mean_ptr, bn_var_ptr, run_mean_ptr, run_var_ptr,
                    nbt_ptr, nonfinite_ptr, C, momentum,
                    HAS_NONFINITE: tl.constexpr, CUMULATIVE: tl.constexpr,
                    MOVING_AVERAGE: tl.constexpr, BLOCK_R: tl.constexpr):
    """The rule of mmsn.ops.statistics.update_running_stats_ over the
    batch's BN statistics (in float64): a batch with a non-finite one moves
    nothing and counts in ``nonfinite`` (slot 0 when an IN mean was not
    finite, which makes its channel's BN mean so, else slot 1)."""
    bad_mean = tl.zeros([], tl.int32)
    bad = tl.zeros([], tl.int32)
    for c0 in range(0, C, BLOCK_R):
        cs = c0 + tl.arange(0, BLOCK_R)
        mask = cs < C
        mean = tl.load(bn_mean_ptr + cs, mask=mask, other=0.,
                       cache_modifier='.cg')
        var = tl.load(bn_var_ptr + cs, mask=mask, other=0.,
                      cache_modifier='.cg')
        bad_mean += tl.sum(tl.where(tl.abs(mean) <= FLT_MAX, 0, 1), axis=0)
        bad += tl.sum(tl.where(tl.abs(var) <= FLT_MAX, 0, 1), axis=0)
    bad += bad_mean
    seen = tl.load(nbt_ptr) + (bad == 0).to(tl.int64)
    tl.store(nbt_ptr, seen)
    if bad > 0:
        if HAS_NONFINITE:
            slot = tl.where(bad_mean > 0, _NONFINITE_INPUT, _OVERFLOWED)
            tl.store(nonfinite_ptr + slot, tl.load(nonfinite_ptr + slot) + 1)
    else:
        factor = tl.zeros([], tl.float64) + momentum
        if CUMULATIVE:
            factor = 1.0 / seen.to(tl.float64)
        for c0 in range(0, C, BLOCK_R):
            cs = c0 + tl.arange(0, BLOCK_R)
            mask = cs < C
            batch_mean = tl.load(bn_mean_ptr + cs, mask=mask, other=0.,
                                 cache_modifier='.cg').to(tl.float64)
            batch_var = tl.load(bn_var_ptr + cs, mask=mask, other=0.,
                                cache_modifier='.cg').to(tl.float64)
            mean = tl.load(run_mean_ptr + cs, mask=mask, other=0.)
            var = tl.load(run_var_ptr + cs, mask=mask, other=0.)
            mean = mean.to(tl.float64)
            var = var.to(tl.float64)
            new_mean = mean + factor * (batch_mean - mean)
            if MOVING_AVERAGE:
                new_var = var + factor * (batch_var - var)
            else:
                # batch average: pools second moments, so the result is
                # the variance of all batches seen
                second = var + mean * mean
                batch_second = batch_var + batch_mean * batch_mean
                new_var = tl.maximum(second + factor * (batch_second - second)
                                     - new_mean * new_mean, 0.)
            tl.store(run_mean_ptr + cs,
                     new_mean.to(run_mean_ptr.dtype.element_ty), mask=mask)
            tl.store(run_var_ptr + cs,
                     new_var.to(run_var_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _count_eval(flags_ptr, nonfinite_ptr, N, BLOCK_R: tl.constexpr):
    """nonfinite[2] += 1 when any sample was flagged."""
    bad = tl.zeros([], tl.int32)
    for n0 in range(0, N, BLOCK_R):
        ns = n0 + tl.arange(0, BLOCK_R)
        bad += tl.sum(tl.load(flags_ptr + ns, mask=ns < N, other=0,
                              cache_modifier='.cg'), axis=0)
    if bad > 0:
        tl.store(nonfinite_ptr + _NONFINITE_EVAL,
                 tl.load(nonfinite_ptr + _NONFINITE_EVAL) + 1)


@triton.jit
def _layer_forward_kernel(
        x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, mw_ptr,
        vw_ptr, bn_mean_ptr, bn_var_ptr, run_mean_ptr, run_var_ptr, nbt_ptr,
        nonfinite_ptr, flags_ptr, ticket_ptr, N, C, L, sxn, sxc, sxl, syn,
        syc, syl, c_blocks, splits, chunk, programs, eps, momentum,
        K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr, POOL_BN: tl.constexpr, UPDATE: tl.constexpr,
        HAS_NONFINITE: tl.constexpr, CUMULATIVE: tl.constexpr,
        MOVING_AVERAGE: tl.constexpr, COUNT_EVAL: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """y of SN given the IN statistics. ``mw``/``vw``: K logits (SOFTMAX)
    or shares [IN, LN(, BN)]. BN statistics (K == 3): pooled from the IN
    ones (POOL_BN; stored to ``bn_mean``/``bn_var`` (C,) by the programs
    of sample 0 when UPDATE) or read from ``bn_mean``/``bn_var``. Tiles run
    in the reverse order of the moments pass, so the first ones read what
    that pass read last, still in L2."""
    pid = programs - 1 - tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    w0, w1, w2 = load_shares(mw_ptr, K, SOFTMAX)
    u0, u1, u2 = load_shares(vw_ptr, K, SOFTMAX)
    ln_mean, ln_var = layer_stats(mean_ptr, var_ptr, n, C, BLOCK_R)
    row = n * C + cs
    m = tl.load(mean_ptr + row, mask=c_mask, other=0.)
    v = tl.load(var_ptr + row, mask=c_mask, other=0.)
    bn_mean, bn_var = branch_stats(mean_ptr, var_ptr, bn_mean_ptr,
                                   bn_var_ptr, m, v, cs, c_mask, N, C, K,
                                   POOL_BN, BLOCK_N, BLOCK_C)
    mean = mixed(m, ln_mean, bn_mean, w0, w1, w2, K == 3)
    var = mixed(v, ln_var, bn_var, u0, u1, u2, K == 3)
    scale = tl.rsqrt(var + eps)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + cs, mask=c_mask,
                         other=0.).to(tl.float32)
    shift = (m - mean) * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + cs, mask=c_mask, other=0.).to(tl.float32)
    _tile_affine(x_ptr, y_ptr, n, cs, c_mask, start, end, sxn, sxc, sxl, syn,
                 syc, syl, m, scale, shift, BLOCK_L)
    first_split = pid % splits == 0
    if UPDATE:
        if (n == 0) & first_split:
            tl.store(bn_mean_ptr + cs, bn_mean, mask=c_mask)
            tl.store(bn_var_ptr + cs, bn_var, mask=c_mask)
            if arrive(ticket_ptr, c_blocks):
                tl.store(ticket_ptr, 0)
                _update_running(bn_mean_ptr, bn_var_ptr, run_mean_ptr,
                                run_var_ptr, nbt_ptr, nonfinite_ptr, C,
                                momentum, HAS_NONFINITE, CUMULATIVE,
                                MOVING_AVERAGE, BLOCK_R)
    if COUNT_EVAL:
        if ((pid // splits) % c_blocks == 0) & first_split:
            finite = (tl.abs(ln_mean) <= FLT_MAX) & (tl.abs(ln_var) <= FLT_MAX)
            tl.store(flags_ptr + n, 1 - finite.to(tl.int32))
            if arrive(ticket_ptr, N):
                tl.store(ticket_ptr, 0)
                _count_eval(flags_ptr, nonfinite_ptr, N, BLOCK_R)
