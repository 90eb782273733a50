"""How SN's Triton kernels cover the tensor: tile shapes along the
contiguous axis and splitting of long rows across programs. Plain Python,
cached per shape."""
import functools
from typing import NamedTuple

import torch

# elements per tile of the big tensor: 8 per thread of 8 warps (a tile
# spans several rows, and each thread keeps per-row coefficients for its
# rows, so larger tiles of short rows cost registers)
TILE = 2048
# elements per block of the (N, C) statistics the kernels pool
SMALL_TILE = 2048
_MAX_POSITIONS_PER_TILE = 1024
_MAX_CHANNELS_PER_TILE = 128
_MAX_SPLITS = 256
# enough programs to fill a GPU: this many per multiprocessor
_PROGRAMS_PER_SM = 4


def cdiv(a: int, b: int) -> int:
    # triton.cdiv and triton.next_power_of_2 are constexpr functions in
    # triton 3.8, whose wrapper costs microseconds a call on the host
    return -(-a // b)


def next_power_of_2(v: int) -> int:
    """The smallest power of 2 >= v, at least 1."""
    return 1 << max(v - 1, 0).bit_length()


class Tiles(NamedTuple):
    """How a tile kernel covers the (N, C, L) tensor."""
    block_c: int
    block_l: int
    c_blocks: int
    splits: int  # programs per row (block)
    chunk: int  # positions per program, a multiple of block_l
    programs: int
    num_warps: int


@functools.lru_cache(maxsize=512)
def plan_tiles(n: int, c: int, length: int, channels_contiguous: bool,
               tile: int = TILE, min_programs: int = 1) -> Tiles:
    """Tile shape and row splitting for an (n, c, length) tensor.

    The tile is long along the contiguous axis (positions for NCHW,
    channels for channels_last), so that loads are coalesced. Rows are
    split across programs (and their moments merged afterwards) when there
    are too few tiles of whole rows to fill ``min_programs`` programs:
    64 rows of 12544 positions need splitting, 65536 rows of 49 do not.
    """
    np2 = next_power_of_2
    if channels_contiguous:
        block_c = min(np2(c), _MAX_CHANNELS_PER_TILE, tile)
        block_l = min(np2(length), max(1, tile // block_c))
    else:
        block_l = min(np2(length), _MAX_POSITIONS_PER_TILE, tile)
        block_c = min(np2(c), max(1, tile // block_l))
    c_blocks = cdiv(c, block_c)
    whole_rows = n * c_blocks
    l_blocks = cdiv(length, block_l)
    splits = 1
    if 0 < whole_rows < min_programs and l_blocks > 1:
        splits = min(l_blocks, cdiv(min_programs, whole_rows),
                     _MAX_SPLITS)
    chunk = max(1, cdiv(l_blocks, splits)) * block_l
    splits = max(1, cdiv(length, chunk))
    num_warps = 8 if block_c * block_l >= 2048 else 4
    return Tiles(block_c, block_l, c_blocks, splits, chunk,
                 whole_rows * splits, num_warps)


def default_min_programs(device: torch.device) -> int:
    """Programs that fill the device: a few per multiprocessor of a GPU;
    1 in the interpreter (never split rows)."""
    if device.type != 'cuda':
        return 1
    index = device.index if device.index is not None else \
        torch.cuda.current_device()
    return _PROGRAMS_PER_SM * _multiprocessors(index)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
