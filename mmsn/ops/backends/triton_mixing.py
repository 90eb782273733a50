"""Triton kernels of SN's per-(n, c) algebra between the passes over the
big tensor (used by :mod:`.triton`): the mixing of IN, LN and BN statistics
in the forward and its closed-form gradient in the backward, on 2D tiles of
the (N, C) statistics, per block of samples (LN statistics, mixing, the
backward's row sums) or per block of channels (the backward's column sums
and dx coefficients). One launch each instead of dozens of small PyTorch
ops.

``w``/``u`` are the importance shares [IN, LN(, BN)] of the means and the
variances; BN statistics are per channel. Float32 throughout; only APIs
present in both triton 3.6 and 3.8 are used.
"""
import triton
import triton.language as tl


@triton.jit
def _in_stats(mean_ptr, var_ptr, ns, n_mask, c0, C, BLOCK_C: tl.constexpr):
    """The IN statistics of samples ``ns`` and channels ``c0`` to ``c0 +
    BLOCK_C``: (channels, their mask, the tile's mask, offsets, mean_in,
    var_in)."""
    cs = c0 + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    mask = n_mask[:, None] & c_mask[None, :]
    offs = ns[:, None] * C + cs[None, :]
    m = tl.load(mean_ptr + offs, mask=mask, other=0.)
    v = tl.load(var_ptr + offs, mask=mask, other=0.)
    return cs, c_mask, mask, offs, m, v


@triton.jit
def _layer_stats(mean_ptr, var_ptr, ns, n_mask, C, BLOCK_C: tl.constexpr):
    """LN statistics of samples ``ns``: mean of the means and mean of
    ``var_in + (mean_in - mean)^2``, in one sweep over channel blocks merged
    with Chan's formula, the means shifted by the sample's first one (no
    cancellation for inputs with a large mean)."""
    pivot = tl.load(mean_ptr + ns * C, mask=n_mask, other=0.)
    mean = pivot * 0.
    m2 = pivot * 0.
    for c0 in range(0, C, BLOCK_C):
        _, _, mask, _, m, v = _in_stats(mean_ptr, var_ptr, ns, n_mask, c0, C,
                                        BLOCK_C)
        m -= pivot[:, None]
        count = tl.minimum(C - c0, BLOCK_C) * 1.0
        block_mean = tl.sum(tl.where(mask, m, 0.), axis=1) / count
        d = tl.where(mask, m - block_mean[:, None], 0.)
        total = c0 + count
        delta = block_mean - mean
        mean = mean + delta * (count / total)
        m2 = m2 + tl.sum(v + d * d, axis=1) + delta * delta * (c0 * count /
                                                               total)
    return pivot + mean, m2 / C


@triton.jit
def _mixed(m, v, ln_mean, ln_var, w_ptr, u_ptr, bn_mean_ptr, bn_var_ptr,
           weight_ptr, cs, c_mask, eps, HAS_BN: tl.constexpr,
           HAS_WEIGHT: tl.constexpr):
    """Mixed mean, rstd = 1 / sqrt(mixed variance + eps) and scale = gamma *
    rstd of a (samples, channels) tile."""
    mean = tl.load(w_ptr) * m + tl.load(w_ptr + 1) * ln_mean[:, None]
    var = tl.load(u_ptr) * v + (tl.load(u_ptr + 1) * ln_var[:, None] + eps)
    if HAS_BN:
        bn_mean = tl.load(bn_mean_ptr + cs, mask=c_mask, other=0.)
        bn_var = tl.load(bn_var_ptr + cs, mask=c_mask, other=0.)
        mean += tl.load(w_ptr + 2) * bn_mean[None, :]
        var += tl.load(u_ptr + 2) * bn_var[None, :]
    rstd = tl.rsqrt(var)
    scale = rstd
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + cs, mask=c_mask, other=0.)[None, :]
    return mean, rstd, scale


@triton.jit
def _mix_forward_kernel(mean_in_ptr, var_in_ptr, weight_ptr, bias_ptr, w_ptr,
                        u_ptr, bn_mean_ptr, bn_var_ptr, scale_ptr, shift_ptr,
                        N, C, eps, HAS_WEIGHT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row ``scale = gamma * rstd`` and ``shift = (mean_in - mean) *
    scale + beta``, for BLOCK_N samples."""
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    ln_mean, ln_var = _layer_stats(mean_in_ptr, var_in_ptr, ns, n_mask, C,
                                   BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cs, c_mask, mask, offs, m, v = _in_stats(mean_in_ptr, var_in_ptr, ns,
                                                 n_mask, c0, C, BLOCK_C)
        mean, _, scale = _mixed(m, v, ln_mean, ln_var, w_ptr, u_ptr,
                                bn_mean_ptr, bn_var_ptr, weight_ptr, cs,
                                c_mask, eps, HAS_BN, HAS_WEIGHT)
        shift = (m - mean) * scale
        if HAS_BIAS:
            shift += tl.load(bias_ptr + cs, mask=c_mask, other=0.)[None, :]
        tl.store(scale_ptr + offs, scale, mask=mask)
        tl.store(shift_ptr + offs, shift, mask=mask)


@triton.jit
def _backward_rows_kernel(dot_ptr, sum_ptr, splits, mean_in_ptr, var_in_ptr,
                          weight_ptr, w_ptr, u_ptr, bn_mean_ptr, bn_var_ptr,
                          rows_ptr, samples_ptr, share_ptr, N, C, eps,
                          HAS_WEIGHT: tl.constexpr, HAS_BN: tl.constexpr,
                          K: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """Backward, per sample: gradients of the mixed statistics per row and
    their sums over channels.

    With ``y = (x - mean) * scale + beta``, ``scale = gamma * rstd``: per
    row ``neg_grad_mean = scale * sum(dy)`` and ``grad_var = -rstd^2 / 2 *
    scale * (dot + (mean_in - mean) * sum(dy))``. Writes per row (layout
    (5, N * C)) neg_grad_mean, grad_var, the d_gamma term, sum(dy), scale;
    per sample (layout (3, N)) the LN mean and the two channel sums; and
    this program's part of the share gradients (one row of ``share_ptr``:
    -d/d mean shares [IN, LN(, 0)], then d/d var shares; K shares each).
    """
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    rows = N * C
    ln_mean, ln_var = _layer_stats(mean_in_ptr, var_in_ptr, ns, n_mask, C,
                                   BLOCK_C)
    gm_row = ns * 0.
    gv_row = ns * 0.
    share_m = ns * 0.
    share_v = ns * 0.
    for c0 in range(0, C, BLOCK_C):
        cs, c_mask, mask, offs, m, v = _in_stats(mean_in_ptr, var_in_ptr, ns,
                                                 n_mask, c0, C, BLOCK_C)
        dot = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        sum_dy = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for s in range(splits):
            dot += tl.load(dot_ptr + s * rows + offs, mask=mask, other=0.)
            sum_dy += tl.load(sum_ptr + s * rows + offs, mask=mask, other=0.)
        mean, rstd, scale = _mixed(m, v, ln_mean, ln_var, w_ptr, u_ptr,
                                   bn_mean_ptr, bn_var_ptr, weight_ptr, cs,
                                   c_mask, eps, HAS_BN, HAS_WEIGHT)
        grad_centered = dot + (m - mean) * sum_dy
        neg_grad_mean = tl.where(mask, scale * sum_dy, 0.)
        grad_var = tl.where(mask, -0.5 * grad_centered * scale * rstd * rstd,
                            0.)
        tl.store(rows_ptr + offs, neg_grad_mean, mask=mask)
        tl.store(rows_ptr + rows + offs, grad_var, mask=mask)
        tl.store(rows_ptr + 2 * rows + offs, grad_centered * rstd, mask=mask)
        tl.store(rows_ptr + 3 * rows + offs, sum_dy, mask=mask)
        tl.store(rows_ptr + 4 * rows + offs, scale, mask=mask)
        gm_row += tl.sum(neg_grad_mean, axis=1)
        gv_row += tl.sum(grad_var, axis=1)
        share_m += tl.sum(neg_grad_mean * m, axis=1)
        share_v += tl.sum(grad_var * v, axis=1)
    tl.store(samples_ptr + ns, ln_mean, mask=n_mask)
    tl.store(samples_ptr + N + ns, gm_row, mask=n_mask)
    tl.store(samples_ptr + 2 * N + ns, gv_row, mask=n_mask)
    out = share_ptr + pid * 2 * K
    tl.store(out, -tl.sum(share_m, axis=0))
    tl.store(out + 1, -tl.sum(gm_row * ln_mean, axis=0))
    tl.store(out + K, tl.sum(share_v, axis=0))
    tl.store(out + K + 1, tl.sum(gv_row * ln_var, axis=0))
    if HAS_BN:
        tl.store(out + 2, 0.)
        tl.store(out + 5, 0.)


@triton.jit
def _backward_columns_kernel(rows_ptr, samples_ptr, mean_in_ptr, w_ptr,
                             u_ptr, bn_mean_ptr, bn_var_ptr, d_gamma_ptr,
                             d_beta_ptr, share_ptr, share_row0, coef_ptr, N,
                             C, L, dof, HAS_BN: tl.constexpr,
                             POOLED_BN: tl.constexpr, NEED_DX: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward, per channel: sums over samples (d_gamma, d_beta, the BN
    share gradients), then, for dx, the coefficients ``b`` and ``k`` of
    ``dx = scale * dy + b * (x - mean_in) + k`` per row (layout
    (2, N * C)), through the IN statistics and the pooled LN (and BN) ones:
    mean_p = mean(mean_in), var_p = mean(var_in + (mean_in - mean_p)^2)
    have d/dmean_in = (1 + 2 g_var (mean_in - mean_p)) / count and
    d/dvar_in = 1 / count."""
    pid = tl.program_id(0)
    cs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    rows = N * C
    gm_col = tl.zeros([BLOCK_C], tl.float32)
    gv_col = tl.zeros([BLOCK_C], tl.float32)
    d_gamma = tl.zeros([BLOCK_C], tl.float32)
    d_beta = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns < N)[:, None] & c_mask[None, :]
        offs = ns[:, None] * C + cs[None, :]
        gm_col += tl.sum(tl.load(rows_ptr + offs, mask=mask, other=0.), 0)
        gv_col += tl.sum(tl.load(rows_ptr + rows + offs, mask=mask, other=0.),
                         0)
        d_gamma += tl.sum(
            tl.load(rows_ptr + 2 * rows + offs, mask=mask, other=0.), 0)
        d_beta += tl.sum(
            tl.load(rows_ptr + 3 * rows + offs, mask=mask, other=0.), 0)
    tl.store(d_gamma_ptr + cs, d_gamma, mask=c_mask)
    tl.store(d_beta_ptr + cs, d_beta, mask=c_mask)
    if HAS_BN:
        bn_mean = tl.load(bn_mean_ptr + cs, mask=c_mask, other=0.)
        bn_var = tl.load(bn_var_ptr + cs, mask=c_mask, other=0.)
        out = share_ptr + (share_row0 + pid) * 6
        tl.store(out, 0.)
        tl.store(out + 1, 0.)
        tl.store(out + 2, -tl.sum(gm_col * bn_mean, axis=0))
        tl.store(out + 3, 0.)
        tl.store(out + 4, 0.)
        tl.store(out + 5, tl.sum(gv_col * bn_var, axis=0))
    if NEED_DX:
        w0 = tl.load(w_ptr)
        u0 = tl.load(u_ptr)
        w_ln = tl.load(w_ptr + 1) / C
        u_ln = tl.load(u_ptr + 1) / C
        if POOLED_BN:
            gm_bn = gm_col * (tl.load(w_ptr + 2) / N)
            gv_bn = gv_col * (tl.load(u_ptr + 2) / N)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < N
            mask = n_mask[:, None] & c_mask[None, :]
            offs = ns[:, None] * C + cs[None, :]
            neg_grad_mean = tl.load(rows_ptr + offs, mask=mask, other=0.)
            grad_var = tl.load(rows_ptr + rows + offs, mask=mask, other=0.)
            m = tl.load(mean_in_ptr + offs, mask=mask, other=0.)
            ln_mean = tl.load(samples_ptr + ns, mask=n_mask, other=0.)
            gm_row = tl.load(samples_ptr + N + ns, mask=n_mask, other=0.)
            gv_ln = tl.load(samples_ptr + 2 * N + ns, mask=n_mask,
                            other=0.) * u_ln
            grad_mean_in = (2. * (m - ln_mean[:, None]) * gv_ln[:, None] -
                            (gm_row * w_ln)[:, None] - w0 * neg_grad_mean)
            grad_var_in = gv_ln[:, None] + u0 * grad_var
            if POOLED_BN:
                grad_mean_in += (2. * (m - bn_mean[None, :]) * gv_bn[None, :]
                                 - gm_bn[None, :])
                grad_var_in += gv_bn[None, :]
            # d var_in / dx = 2 (x - mean_in) / dof, d mean_in / dx = 1 / L
            tl.store(coef_ptr + offs, grad_var_in * (2. / dof), mask=mask)
            tl.store(coef_ptr + rows + offs, grad_mean_in / L, mask=mask)
