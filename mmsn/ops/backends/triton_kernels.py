"""Triton kernels of SN's row passes over the big tensor (launched by
:mod:`.triton_launch`; the whole layer's kernels, with the per-(n, c)
algebra inside, are in :mod:`.triton_layer` and
:mod:`.triton_layer_backward`).

The tensor is viewed as (N, C, L) with any strides. A program owns
``BLOCK_C`` channels of one sample and a chunk of ``chunk`` positions (a
whole row unless long rows are split across programs), walked in
``BLOCK_L`` steps. The block shape follows the layout (long along L for
NCHW, along C for channels_last), so loads are coalesced either way;
program ``pid`` decomposes as (sample, channel block, split), split
fastest (see :mod:`.triton_tiles`).

Everything accumulates in float32: loads are cast on the way in, stores
cast to the output's dtype. Only APIs present in both triton 3.6 and 3.8
are used.
"""
import triton
import triton.language as tl

from .triton_stats import arrive


@triton.jit
def _tile(pid, c_blocks, splits, chunk, C, L, BLOCK_C: tl.constexpr):
    """(sample, channel offsets, channel mask, first and end position) of
    the program's tile."""
    s = pid % splits
    rest = pid // splits
    n = rest // c_blocks
    cs = (rest % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = s * chunk
    end = tl.minimum(start + chunk, L)
    return n, cs, cs < C, start, end


@triton.jit
def _tile_affine(x_ptr, y_ptr, n, cs, c_mask, start, end, sxn, sxc, sxl,
                 syn, syc, syl, mean, scale, shift, BLOCK_L: tl.constexpr):
    """y = (x - mean) * scale + shift over the tile; per-row (BLOCK_C,)
    coefficients."""
    mean = mean[:, None]
    scale = scale[:, None]
    shift = shift[:, None]
    n64 = n.to(tl.int64)
    x_base = x_ptr + n64 * sxn + cs[:, None] * sxc
    y_base = y_ptr + n64 * syn + cs[:, None] * syc
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        mask = c_mask[:, None] & (ls < end)[None, :]
        x = tl.load(x_base + ls[None, :] * sxl, mask=mask, other=0.)
        y = (x.to(tl.float32) - mean) * scale + shift
        tl.store(y_base + ls[None, :] * syl, y.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _tile_grad_sums(dy_ptr, x_ptr, n, cs, c_mask, start, end, sdn, sdc,
                    sdl, sxn, sxc, sxl, mean, BLOCK_C: tl.constexpr,
                    BLOCK_L: tl.constexpr):
    """Per row of the tile, sum(dy * (x - mean)) and sum(dy): summed in 2D
    and reduced once at the end."""
    mean = mean[:, None]
    n64 = n.to(tl.int64)
    x_base = x_ptr + n64 * sxn + cs[:, None] * sxc
    dy_base = dy_ptr + n64 * sdn + cs[:, None] * sdc
    dot = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    total = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        mask = c_mask[:, None] & (ls < end)[None, :]
        x = tl.load(x_base + ls[None, :] * sxl, mask=mask, other=0.)
        dy = tl.load(dy_base + ls[None, :] * sdl, mask=mask, other=0.)
        dy = dy.to(tl.float32)
        dot += dy * (x.to(tl.float32) - mean)
        total += dy
    return tl.sum(dot, axis=1), tl.sum(total, axis=1)


@triton.jit
def _tile_grad_input(dy_ptr, x_ptr, dx_ptr, n, cs, c_mask, start, end, sdn,
                     sdc, sdl, sxn, sxc, sxl, son, soc, sol, mean, a, b, k,
                     BLOCK_L: tl.constexpr):
    """dx = a * dy + b * (x - mean) + k over the tile; per-row (BLOCK_C,)
    coefficients."""
    mean = mean[:, None]
    a = a[:, None]
    b = b[:, None]
    k = k[:, None]
    n64 = n.to(tl.int64)
    x_base = x_ptr + n64 * sxn + cs[:, None] * sxc
    dy_base = dy_ptr + n64 * sdn + cs[:, None] * sdc
    dx_base = dx_ptr + n64 * son + cs[:, None] * soc
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        mask = c_mask[:, None] & (ls < end)[None, :]
        x = tl.load(x_base + ls[None, :] * sxl, mask=mask, other=0.)
        dy = tl.load(dy_base + ls[None, :] * sdl, mask=mask, other=0.)
        dx = a * dy.to(tl.float32) + b * (x.to(tl.float32) - mean) + k
        tl.store(dx_base + ls[None, :] * sol, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, var_ptr, part_ptr, ticket_ptr, C, L,
                    sxn, sxc, sxl, c_blocks, splits, chunk, rows, dof,
                    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                    SPLIT: tl.constexpr):
    """Mean and variance (squared deviations / dof) of each row, in float32
    without cancellation: values are shifted by the row's first one (a
    pivot all splits of the row share), each lane of the tile keeps a
    Welford mean and m2 of the values it sees (no reduction inside the
    loop), and the lanes are merged at the end (Chan's formula as two
    sums). Split rows store each chunk's (mean - pivot, m2) in ``part``
    (layout (2, splits, rows)); the last split of a tile to finish (a
    ticket per tile) merges them in split order."""
    pid = tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    base = x_ptr + n.to(tl.int64) * sxn + cs[:, None] * sxc
    pivot = tl.load(base, mask=c_mask[:, None], other=0.).to(tl.float32)
    count = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    mean = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_L], tl.float32)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        mask = c_mask[:, None] & (ls < end)[None, :]
        x = tl.load(base + ls[None, :] * sxl, mask=mask, other=0.)
        # only the last tile is partial: every lane still in the row has
        # seen the same number of values
        rcount = 1.0 / ((l0 - start) // BLOCK_L + 1.0)
        delta = tl.where(mask, x.to(tl.float32) - pivot - mean, 0.)
        mean += delta * rcount
        m2 += delta * tl.where(mask, x.to(tl.float32) - pivot - mean, 0.)
        count += tl.where(mask, 1.0, 0.)
    row_mean = tl.sum(count * mean, axis=1) / (end - start)
    d = mean - row_mean[:, None]
    row_m2 = tl.sum(m2 + count * d * d, axis=1)
    row = n * C + cs
    pivot = tl.sum(pivot, axis=1)
    if SPLIT:
        part_mean = part_ptr + row
        part_m2 = part_ptr + splits * rows + row
        tl.store(part_mean + (pid % splits) * rows, row_mean, mask=c_mask)
        tl.store(part_m2 + (pid % splits) * rows, row_m2, mask=c_mask)
        tile = pid // splits
        if arrive(ticket_ptr + tile, splits):
            tl.store(ticket_ptr + tile, 0)
            row_mean = tl.zeros([BLOCK_C], tl.float32)
            for s in range(splits):
                size = tl.minimum(L - s * chunk, chunk) * 1.0
                row_mean += size * tl.load(part_mean + s * rows, mask=c_mask,
                                           other=0., cache_modifier='.cg')
            row_mean = row_mean / L
            row_m2 = tl.zeros([BLOCK_C], tl.float32)
            for s in range(splits):
                size = tl.minimum(L - s * chunk, chunk) * 1.0
                dev = tl.load(part_mean + s * rows, mask=c_mask, other=0.,
                              cache_modifier='.cg') - row_mean
                row_m2 += tl.load(part_m2 + s * rows, mask=c_mask, other=0.,
                                  cache_modifier='.cg') + size * dev * dev
            tl.store(mean_ptr + row, pivot + row_mean, mask=c_mask)
            tl.store(var_ptr + row, row_m2 / dof, mask=c_mask)
    else:
        tl.store(mean_ptr + row, pivot + row_mean, mask=c_mask)
        tl.store(var_ptr + row, row_m2 / dof, mask=c_mask)


@triton.jit
def _affine_kernel(x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, C, L,
                   sxn, sxc, sxl, syn, syc, syl, c_blocks, splits, chunk,
                   programs, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = (x - mean) * scale + shift per row. Tiles run in the reverse
    order of the moments pass, so the first ones read what that pass read
    last, still in L2."""
    pid = programs - 1 - tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    row = n * C + cs
    _tile_affine(x_ptr, y_ptr, n, cs, c_mask, start, end, sxn, sxc, sxl, syn,
                 syc, syl, tl.load(mean_ptr + row, mask=c_mask, other=0.),
                 tl.load(scale_ptr + row, mask=c_mask, other=0.),
                 tl.load(shift_ptr + row, mask=c_mask, other=0.), BLOCK_L)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, dot_ptr, sum_ptr, C, L,
                      sdn, sdc, sdl, sxn, sxc, sxl, c_blocks, splits, chunk,
                      rows, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per row (chunk) sum(dy * (x - mean)) and sum(dy), stored at
    ``s * rows + row``; summed in 2D and reduced once at the end."""
    pid = tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    row = n * C + cs
    dot, total = _tile_grad_sums(
        dy_ptr, x_ptr, n, cs, c_mask, start, end, sdn, sdc, sdl, sxn, sxc,
        sxl, tl.load(mean_ptr + row, mask=c_mask, other=0.), BLOCK_C,
        BLOCK_L)
    out = (pid % splits) * rows + row
    tl.store(dot_ptr + out, dot, mask=c_mask)
    tl.store(sum_ptr + out, total, mask=c_mask)


@triton.jit
def _grad_input_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, a_ptr, b_ptr, k_ptr,
                       C, L, sdn, sdc, sdl, sxn, sxc, sxl, son, soc, sol,
                       c_blocks, splits, chunk, programs,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = a * dy + b * (x - mean) + k per row, tiles in the reverse order
    of the grad-sums pass."""
    pid = programs - 1 - tl.program_id(0)
    n, cs, c_mask, start, end = _tile(pid, c_blocks, splits, chunk, C, L,
                                      BLOCK_C)
    row = n * C + cs
    _tile_grad_input(dy_ptr, x_ptr, dx_ptr, n, cs, c_mask, start, end, sdn,
                     sdc, sdl, sxn, sxc, sxl, son, soc, sol,
                     tl.load(mean_ptr + row, mask=c_mask, other=0.),
                     tl.load(a_ptr + row, mask=c_mask, other=0.),
                     tl.load(b_ptr + row, mask=c_mask, other=0.),
                     tl.load(k_ptr + row, mask=c_mask, other=0.), BLOCK_L)
