"""Triton device functions of SN's per-(n, c) algebra, inlined into the
layer kernels (:mod:`.triton_layer`, :mod:`.triton_layer_backward`): the
importance shares, the LN statistics of one sample and the BN statistics
of a block of channels pooled from the IN ones, the mixing, and the ticket
by which the last program of a group reduces what the group stored.

Every program that needs a pooled statistic computes it itself from the
(N, C) IN statistics with the same code and block sizes, so all programs
(and the backward) see bit-identical values, without a launch in between.
Float32 throughout; only APIs present in both triton 3.6 and 3.8 are used.
"""
import triton
import triton.language as tl

# the largest finite float32: |v| <= FLT_MAX is False for inf and NaN
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def load_shares(ptr, K: tl.constexpr, SOFTMAX: tl.constexpr):
    """Shares [IN, LN, BN] (BN 0 when K == 2) from K importance logits
    (their softmax) or K shares, as float32 scalars."""
    s0 = tl.load(ptr).to(tl.float32)
    s1 = tl.load(ptr + 1).to(tl.float32)
    s2 = s0 * 0.
    if K == 3:
        s2 = tl.load(ptr + 2).to(tl.float32)
    if SOFTMAX:
        top = tl.maximum(s0, s1)
        if K == 3:
            top = tl.maximum(top, s2)
        s0 = tl.exp(s0 - top)
        s1 = tl.exp(s1 - top)
        if K == 3:
            s2 = tl.exp(s2 - top)
        total = s0 + s1 + s2
        s0 = s0 / total
        s1 = s1 / total
        s2 = s2 / total
    return s0, s1, s2


@triton.jit
def layer_stats(mean_ptr, var_ptr, n, C, BLOCK_R: tl.constexpr):
    """LN statistics of sample ``n``: the mean of its IN means and the mean
    of ``var_in + (mean_in - mean)^2``, in one sweep over blocks of
    channels merged by Chan's formula, the means shifted by the sample's
    first one (no cancellation for inputs with a large mean)."""
    base = n * C
    pivot = tl.load(mean_ptr + base)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for c0 in range(0, C, BLOCK_R):
        cs = c0 + tl.arange(0, BLOCK_R)
        mask = cs < C
        m = tl.load(mean_ptr + base + cs, mask=mask, other=0.) - pivot
        v = tl.load(var_ptr + base + cs, mask=mask, other=0.)
        count = tl.minimum(C - c0, BLOCK_R) * 1.0
        block_mean = tl.sum(tl.where(mask, m, 0.), axis=0) / count
        d = tl.where(mask, m - block_mean, 0.)
        total = c0 + count
        delta = block_mean - mean
        mean += delta * (count / total)
        m2 += tl.sum(v + d * d, axis=0) + delta * delta * (c0 * count /
                                                           total)
    return pivot + mean, m2 / C


@triton.jit
def batch_stats(mean_ptr, var_ptr, cs, c_mask, N, C, BLOCK_N: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """BN statistics of channels ``cs``, pooled over the N samples as the
    LN ones are over channels (same sweep, around sample 0's means)."""
    pivot = tl.load(mean_ptr + cs, mask=c_mask, other=0.)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns < N)[:, None] & c_mask[None, :]
        offs = ns[:, None] * C + cs[None, :]
        m = tl.load(mean_ptr + offs, mask=mask, other=0.) - pivot[None, :]
        v = tl.load(var_ptr + offs, mask=mask, other=0.)
        count = tl.minimum(N - n0, BLOCK_N) * 1.0
        block_mean = tl.sum(tl.where(mask, m, 0.), axis=0) / count
        d = tl.where(mask, m - block_mean[None, :], 0.)
        total = n0 + count
        delta = block_mean - mean
        mean += delta * (count / total)
        m2 += tl.sum(v + d * d, axis=0) + delta * delta * (n0 * count /
                                                           total)
    return pivot + mean, m2 / N


@triton.jit
def branch_stats(mean_ptr, var_ptr, bn_mean_ptr, bn_var_ptr, m, v, cs,
                 c_mask, N, C, K: tl.constexpr, POOL_BN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The BN statistics channels ``cs`` mix: pooled from the IN ones
    (POOL_BN) or given at ``bn_mean``/``bn_var``; without a BN branch
    (K == 2) the IN ones ``m``, ``v`` (unused)."""
    bn_mean = m
    bn_var = v
    if K == 3:
        if POOL_BN:
            bn_mean, bn_var = batch_stats(mean_ptr, var_ptr, cs, c_mask, N, C,
                                          BLOCK_N, BLOCK_C)
        else:
            bn_mean = tl.load(bn_mean_ptr + cs, mask=c_mask,
                              other=0.).to(tl.float32)
            bn_var = tl.load(bn_var_ptr + cs, mask=c_mask,
                             other=0.).to(tl.float32)
    return bn_mean, bn_var


@triton.jit
def mixed(stat_in, stat_ln, stat_bn, s0, s1, s2, HAS_BN: tl.constexpr):
    """``in + s1 (ln - in) + s2 (bn - in)``: equal statistics (a constant
    input) give exactly that statistic although float shares do not sum to
    exactly 1; where a statistic is infinite (inf - inf) the plain sum
    ``s0 in + s1 ln + s2 bn`` stands."""
    exact = stat_in + s1 * (stat_ln - stat_in)
    plain = s0 * stat_in + s1 * stat_ln
    if HAS_BN:
        exact += s2 * (stat_bn - stat_in)
        plain += s2 * stat_bn
    return tl.where(exact != exact, plain, exact)


@triton.jit
def arrive(ticket_ptr, count):
    """Counts this program in at a ticket its group of ``count`` programs
    shares; True in the last to arrive, which then finds whatever the
    others stored before arriving, and must reset the ticket to 0 (so the
    next launch finds it so). Integer atomics only: which program is last
    depends on scheduling, what it computes does not."""
    tl.debug_barrier()  # every thread's stores come before the release
    return tl.atomic_add(ticket_ptr, 1, sem='acq_rel') == count - 1
