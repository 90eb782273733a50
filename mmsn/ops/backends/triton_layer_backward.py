"""Triton kernels of SN's backward: two launches (used by :mod:`.triton`).

With ``y = (x - mean) * scale + beta``, ``scale = gamma * rstd``, per row
(sample n, channel c) ``neg_grad_mean = scale * sum(dy)`` and ``grad_var
= -rstd^2 / 2 * scale * (dot + (mean_in - mean) * sum(dy))``, ``dot =
sum(dy * (x - mean_in))``.

1. :func:`_layer_backward_kernel`: a program owns a tile of
   :func:`.triton_kernels._tile`, sums ``dot`` and ``sum(dy)`` over it
   (split rows: the last split of the tile to finish adds the splits' sums
   in order), pools the LN and BN statistics it mixes (:mod:`.triton_stats`)
   and stores per row the gradients above (layout (5, N * C):
   neg_grad_mean, grad_var, scale, the d_gamma term, sum(dy)) and per tile
   their sums (layout (10, N * c_blocks)). Tickets then make the last tile
   of each sample sum its tiles (layout (11, N)), the last tile of each
   channel block sum its samples (d_gamma, d_beta; layout (3, C) for dx),
   and the last sample reducer the share gradients: every sum is taken in
   a fixed order, by whichever program arrives last.
2. :func:`_layer_grad_input_kernel` (when dx is needed): ``dx = scale * dy
   + b * (x - mean_in) + k`` per row, through the IN statistics and the
   pooled LN (and BN) ones.

The share gradients are summed around the mixed statistic of each row
(``sum(neg_grad_mean * (stat_k - mean))`` and ``sum(neg_grad_mean *
mean)`` apart), so that the softmax's backward, a difference of nearly
equal gradients for inputs with a large mean, keeps its precision.
"""
import triton
import triton.language as tl

from .triton_kernels import _tile, _tile_grad_input, _tile_grad_sums
from .triton_stats import (arrive, branch_stats, layer_stats, load_shares,
                           mixed)

# fields of the per-tile and per-sample sums
_FIELDS = tl.constexpr(10)
_LN_MEAN = tl.constexpr(10)


@triton.jit
def _sum(ptr, count, BLOCK_R: tl.constexpr):
    """Sum of ``count`` contiguous floats, block after block."""
    total = tl.zeros([], tl.float32)
    for i0 in range(0, count, BLOCK_R):
        idx = i0 + tl.arange(0, BLOCK_R)
        total += tl.sum(tl.load(ptr + idx, mask=idx < count, other=0.,
                                cache_modifier='.cg'), axis=0)
    return total


@triton.jit
def _share_grads(samples_ptr, N, mw_ptr, vw_ptr, d_mw_ptr, d_vw_ptr,
                 K: tl.constexpr, SOFTMAX: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """Gradients of the K mean and K variance logits (SOFTMAX) or shares,
    from the per-sample sums (fields 2-9)."""
    a_in = _sum(samples_ptr + 2 * N, N, BLOCK_R)
    a_ln = _sum(samples_ptr + 3 * N, N, BLOCK_R)
    a_bn = _sum(samples_ptr + 4 * N, N, BLOCK_R)
    a_mix = _sum(samples_ptr + 5 * N, N, BLOCK_R)
    b_in = _sum(samples_ptr + 6 * N, N, BLOCK_R)
    b_ln = _sum(samples_ptr + 7 * N, N, BLOCK_R)
    b_bn = _sum(samples_ptr + 8 * N, N, BLOCK_R)
    b_mix = _sum(samples_ptr + 9 * N, N, BLOCK_R)
    if SOFTMAX:
        # s_k (g_k - sum_j s_j g_j) with g_k = -(a_k + a_mix): a_mix
        # cancels (the shares sum to 1)
        w0, w1, w2 = load_shares(mw_ptr, K, SOFTMAX)
        u0, u1, u2 = load_shares(vw_ptr, K, SOFTMAX)
        a = w0 * a_in + w1 * a_ln + w2 * a_bn
        b = u0 * b_in + u1 * b_ln + u2 * b_bn
        g_in, g_ln, g_bn = w0 * (a - a_in), w1 * (a - a_ln), w2 * (a - a_bn)
        h_in, h_ln, h_bn = u0 * (b_in - b), u1 * (b_ln - b), u2 * (b_bn - b)
    else:
        g_in, g_ln, g_bn = -(a_in + a_mix), -(a_ln + a_mix), -(a_bn + a_mix)
        h_in, h_ln, h_bn = b_in + b_mix, b_ln + b_mix, b_bn + b_mix
    tl.store(d_mw_ptr, g_in.to(d_mw_ptr.dtype.element_ty))
    tl.store(d_mw_ptr + 1, g_ln.to(d_mw_ptr.dtype.element_ty))
    tl.store(d_vw_ptr, h_in.to(d_vw_ptr.dtype.element_ty))
    tl.store(d_vw_ptr + 1, h_ln.to(d_vw_ptr.dtype.element_ty))
    if K == 3:
        tl.store(d_mw_ptr + 2, g_bn.to(d_mw_ptr.dtype.element_ty))
        tl.store(d_vw_ptr + 2, h_bn.to(d_vw_ptr.dtype.element_ty))


@triton.jit
def _channel_sums(rows_ptr, channels_ptr, d_gamma_ptr, d_beta_ptr, cs,
                  c_mask, bn_mean, N, C, BLOCK_N: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Sums over the samples of channels ``cs``: d_gamma, d_beta, and the
    gradients of the BN statistics dx needs."""
    rows = N * C
    gm = tl.zeros([BLOCK_C], tl.float32)
    gv = tl.zeros([BLOCK_C], tl.float32)
    d_gamma = tl.zeros([BLOCK_C], tl.float32)
    d_beta = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns < N)[:, None] & c_mask[None, :]
        offs = rows_ptr + ns[:, None] * C + cs[None, :]
        gm += tl.sum(tl.load(offs, mask=mask, other=0.,
                             cache_modifier='.cg'), axis=0)
        gv += tl.sum(tl.load(offs + rows, mask=mask, other=0.,
                             cache_modifier='.cg'), axis=0)
        d_gamma += tl.sum(tl.load(offs + 3 * rows, mask=mask, other=0.,
                                  cache_modifier='.cg'), axis=0)
        d_beta += tl.sum(tl.load(offs + 4 * rows, mask=mask, other=0.,
                                 cache_modifier='.cg'), axis=0)
    tl.store(channels_ptr + cs, gm, mask=c_mask)
    tl.store(channels_ptr + C + cs, gv, mask=c_mask)
    tl.store(channels_ptr + 2 * C + cs, bn_mean, mask=c_mask)
    tl.store(d_gamma_ptr + cs, d_gamma.to(d_gamma_ptr.dtype.element_ty),
             mask=c_mask)
    tl.store(d_beta_ptr + cs, d_beta.to(d_beta_ptr.dtype.element_ty),
             mask=c_mask)


@triton.jit
def _row_grads(dot, sum_dy, n, cs, c_mask, tile, mean_ptr, var_ptr,
               weight_ptr, mw_ptr, vw_ptr, bn_mean_ptr, bn_var_ptr, rows_ptr,
               blocks_ptr, samples_ptr, channels_ptr, d_gamma_ptr,
               d_beta_ptr, d_mw_ptr, d_vw_ptr, tickets_ptr, N, C, c_blocks,
               eps, K: tl.constexpr, SOFTMAX: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, POOL_BN: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Everything after a tile's row sums are complete (see the module)."""
    w0, w1, w2 = load_shares(mw_ptr, K, SOFTMAX)
    u0, u1, u2 = load_shares(vw_ptr, K, SOFTMAX)
    ln_mean, ln_var = layer_stats(mean_ptr, var_ptr, n, C, BLOCK_R)
    rows = N * C
    row = n * C + cs
    m = tl.load(mean_ptr + row, mask=c_mask, other=0.)
    v = tl.load(var_ptr + row, mask=c_mask, other=0.)
    bn_mean, bn_var = branch_stats(mean_ptr, var_ptr, bn_mean_ptr,
                                   bn_var_ptr, m, v, cs, c_mask, N, C, K,
                                   POOL_BN, BLOCK_N, BLOCK_C)
    mean = mixed(m, ln_mean, bn_mean, w0, w1, w2, K == 3)
    var = mixed(v, ln_var, bn_var, u0, u1, u2, K == 3)
    rstd = tl.rsqrt(var + eps)
    scale = rstd
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + cs, mask=c_mask,
                         other=0.).to(tl.float32)
    grad_centered = dot + (m - mean) * sum_dy
    neg_grad_mean = tl.where(c_mask, scale * sum_dy, 0.)
    grad_var = tl.where(c_mask, -0.5 * grad_centered * scale * rstd * rstd,
                        0.)
    tl.store(rows_ptr + row, neg_grad_mean, mask=c_mask)
    tl.store(rows_ptr + rows + row, grad_var, mask=c_mask)
    tl.store(rows_ptr + 2 * rows + row, scale, mask=c_mask)
    tl.store(rows_ptr + 3 * rows + row, grad_centered * rstd, mask=c_mask)
    tl.store(rows_ptr + 4 * rows + row, sum_dy, mask=c_mask)
    tiles = N * c_blocks
    out = blocks_ptr + tile
    tl.store(out, tl.sum(neg_grad_mean, axis=0))
    tl.store(out + tiles, tl.sum(grad_var, axis=0))
    tl.store(out + 2 * tiles, tl.sum(neg_grad_mean * (m - mean), axis=0))
    tl.store(out + 3 * tiles, tl.sum(neg_grad_mean * (ln_mean - mean),
                                     axis=0))
    tl.store(out + 4 * tiles, tl.sum(neg_grad_mean * (bn_mean - mean),
                                     axis=0))
    tl.store(out + 5 * tiles, tl.sum(neg_grad_mean * mean, axis=0))
    tl.store(out + 6 * tiles, tl.sum(grad_var * (v - var), axis=0))
    tl.store(out + 7 * tiles, tl.sum(grad_var * (ln_var - var), axis=0))
    tl.store(out + 8 * tiles, tl.sum(grad_var * (bn_var - var), axis=0))
    tl.store(out + 9 * tiles, tl.sum(grad_var * var, axis=0))
    sample_tickets = tickets_ptr + tiles
    channel_tickets = sample_tickets + N
    final_ticket = channel_tickets + c_blocks
    if arrive(sample_tickets + n, c_blocks):
        tl.store(sample_tickets + n, 0)
        for f in tl.static_range(_FIELDS):
            tl.store(samples_ptr + f * N + n,
                     _sum(blocks_ptr + f * tiles + n * c_blocks, c_blocks,
                          BLOCK_R))
        tl.store(samples_ptr + _LN_MEAN * N + n, ln_mean)
        if arrive(final_ticket, N):
            tl.store(final_ticket, 0)
            _share_grads(samples_ptr, N, mw_ptr, vw_ptr, d_mw_ptr, d_vw_ptr,
                         K, SOFTMAX, BLOCK_R)
    cb = tile % c_blocks
    if arrive(channel_tickets + cb, N):
        tl.store(channel_tickets + cb, 0)
        _channel_sums(rows_ptr, channels_ptr, d_gamma_ptr, d_beta_ptr, cs,
                      c_mask, bn_mean, N, C, BLOCK_N, BLOCK_C)


@triton.jit
def _layer_backward_kernel(
        dy_ptr, x_ptr, mean_ptr, var_ptr, weight_ptr, mw_ptr, vw_ptr,
        bn_mean_ptr, bn_var_ptr, part_ptr, rows_ptr, blocks_ptr, samples_ptr,
        channels_ptr, d_gamma_ptr, d_beta_ptr, d_mw_ptr, d_vw_ptr,
        tickets_ptr, N, C, L, sdn, sdc, sdl, sxn, sxc, sxl, c_blocks, splits,
        chunk, eps, K: tl.constexpr, SOFTMAX: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, POOL_BN: tl.constexpr,
        SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The row sums of a tile, then :func:`_row_grads`. Tickets (int32,
    zero on entry and on exit): N * c_blocks per tile (split rows), N per
    sample, c_blocks per channel block, one final."""
    pid = tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    row = n * C + cs
    dot_row, sum_row = _tile_grad_sums(
        dy_ptr, x_ptr, n, cs, c_mask, start, end, sdn, sdc, sdl, sxn, sxc,
        sxl, tl.load(mean_ptr + row, mask=c_mask, other=0.), BLOCK_C,
        BLOCK_L)
    tile = pid // splits
    if SPLIT:
        rows = N * C
        part_dot = part_ptr + row
        part_sum = part_ptr + splits * rows + row
        tl.store(part_dot + (pid % splits) * rows, dot_row, mask=c_mask)
        tl.store(part_sum + (pid % splits) * rows, sum_row, mask=c_mask)
        if arrive(tickets_ptr + tile, splits):
            tl.store(tickets_ptr + tile, 0)
            dot_row = tl.zeros([BLOCK_C], tl.float32)
            sum_row = tl.zeros([BLOCK_C], tl.float32)
            for s in range(splits):
                dot_row += tl.load(part_dot + s * rows, mask=c_mask,
                                   other=0., cache_modifier='.cg')
                sum_row += tl.load(part_sum + s * rows, mask=c_mask,
                                   other=0., cache_modifier='.cg')
            _row_grads(dot_row, sum_row, n, cs, c_mask, tile, mean_ptr,
                       var_ptr, weight_ptr, mw_ptr, vw_ptr, bn_mean_ptr,
                       bn_var_ptr, rows_ptr, blocks_ptr, samples_ptr,
                       channels_ptr, d_gamma_ptr, d_beta_ptr, d_mw_ptr,
                       d_vw_ptr, tickets_ptr, N, C, c_blocks, eps, K,
                       SOFTMAX, HAS_WEIGHT, POOL_BN, BLOCK_C, BLOCK_R,
                       BLOCK_N)
    else:
        _row_grads(dot_row, sum_row, n, cs, c_mask, tile, mean_ptr, var_ptr,
                   weight_ptr, mw_ptr, vw_ptr, bn_mean_ptr, bn_var_ptr,
                   rows_ptr, blocks_ptr, samples_ptr, channels_ptr,
                   d_gamma_ptr, d_beta_ptr, d_mw_ptr, d_vw_ptr, tickets_ptr,
                   N, C, c_blocks, eps, K, SOFTMAX, HAS_WEIGHT, POOL_BN,
                   BLOCK_C, BLOCK_R, BLOCK_N)


@triton.jit
def _layer_grad_input_kernel(
        dy_ptr, x_ptr, dx_ptr, mean_ptr, mw_ptr, vw_ptr, rows_ptr,
        samples_ptr, channels_ptr, N, C, L, sdn, sdc, sdl, sxn, sxc, sxl,
        son, soc, sol, c_blocks, splits, chunk, programs, dof,
        K: tl.constexpr, SOFTMAX: tl.constexpr, POOLED_GRAD: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx per row, through the IN statistics and the pooled LN (and, with
    POOLED_GRAD, BN) ones: mean_p = mean(mean_in), var_p = mean(var_in +
    (mean_in - mean_p)^2) have d/dmean_in = (1 + 2 g_var (mean_in -
    mean_p)) / count and d/dvar_in = 1 / count. The IN share acts as 1
    minus the others (the mixing's form). Tiles run in the reverse order
    of the row sums."""
    pid = programs - 1 - tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    _, w1, w2 = load_shares(mw_ptr, K, SOFTMAX)
    _, u1, u2 = load_shares(vw_ptr, K, SOFTMAX)
    rows = N * C
    row = n * C + cs
    neg_grad_mean = tl.load(rows_ptr + row, mask=c_mask, other=0.)
    grad_var = tl.load(rows_ptr + rows + row, mask=c_mask, other=0.)
    scale = tl.load(rows_ptr + 2 * rows + row, mask=c_mask, other=0.)
    m = tl.load(mean_ptr + row, mask=c_mask, other=0.)
    gm_row = tl.load(samples_ptr + n)
    gv_ln = tl.load(samples_ptr + N + n) * (u1 / C)
    ln_mean = tl.load(samples_ptr + _LN_MEAN * N + n)
    grad_mean_in = (2. * (m - ln_mean) * gv_ln - gm_row * (w1 / C) -
                    (1. - w1 - w2) * neg_grad_mean)
    grad_var_in = gv_ln + (1. - u1 - u2) * grad_var
    if POOLED_GRAD:
        gm_bn = tl.load(channels_ptr + cs, mask=c_mask, other=0.) * (w2 / N)
        gv_bn = tl.load(channels_ptr + C + cs, mask=c_mask,
                        other=0.) * (u2 / N)
        bn_mean = tl.load(channels_ptr + 2 * C + cs, mask=c_mask, other=0.)
        grad_mean_in += 2. * (m - bn_mean) * gv_bn - gm_bn
        grad_var_in += gv_bn
    # d var_in / dx = 2 (x - mean_in) / dof, d mean_in / dx = 1 / L
    _tile_grad_input(dy_ptr, x_ptr, dx_ptr, n, cs, c_mask, start, end, sdn,
                     sdc, sdl, sxn, sxc, sxl, son, soc, sol, m, scale,
                     grad_var_in * (2. / dof), grad_mean_in / L, BLOCK_L)
