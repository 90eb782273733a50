"""The tickets of SN's Triton kernels: int32 counters by which the last
program of a group finds that the others are done (see
:func:`.triton_stats.arrive`).

Every kernel leaves its counters at 0, so one zeroed buffer per device and
stream serves every launch after it, without a fill kernel per call. A
buffer is only ever replaced by a larger one, and never freed: a CUDA
graph captured with it keeps pointing at it.
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor

# enough for most layers at once (4 KiB), so that buffers rarely grow
_MIN_TICKETS = 1024


class Tickets:
    """Zeroed int32 counters per (device, stream)."""

    def __init__(self) -> None:
        self._buffers: Dict[Tuple, Tensor] = {}
        self._retired: List[Tensor] = []

    def get(self, device: torch.device, count: int) -> Tensor:
        """At least ``count`` zeroed counters for kernels launched on the
        current stream of ``device``."""
        key = _stream_key(device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < count:
            if buf is not None:
                self._retired.append(buf)
            size = max(_MIN_TICKETS, 2 * count)
            buf = torch.zeros(size, dtype=torch.int32, device=device)
            self._buffers[key] = buf
        return buf


def _stream_key(device: torch.device) -> Tuple:
    if device.type != 'cuda':
        return (device.type, device.index)
    index = device.index if device.index is not None else \
        torch.cuda.current_device()
    # a plain integer, without building a Stream object
    return ('cuda', index, torch._C._cuda_getCurrentRawStream(index))
