"""The tickets of SN's Triton kernels: int32 counters by which the last
program of a group finds that the others are done (see
:func:`.triton_stats.arrive`).

Every kernel leaves its counters at 0, so one zeroed buffer per device and
stream serves every launch after it, without a fill kernel per call. A
buffer is only ever replaced by a larger one, and never freed: a CUDA
graph captured with it keeps pointing at it. Nor is it ever a graph's:
torch.compile's cudagraph trees route every allocation of the thread that
records a graph into the graph's private pool, and refuse a tensor there
that outlives the graph; a buffer allocated by another thread is not
routed.
"""
import threading
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
            buf = _outside_graph_pools(max(_MIN_TICKETS, 2 * count), device)
            buf.zero_()  # on the current stream, so kernels after it see 0
            self._buffers[key] = buf
        return buf


def _outside_graph_pools(size: int, device: torch.device) -> Tensor:
    """An int32 buffer allocated by a helper thread on CUDA (see the
    module)."""
    if device.type != 'cuda':
        return torch.empty(size, dtype=torch.int32, device=device)
    result = []

    def allocate():
        try:
            result.append(torch.empty(size, dtype=torch.int32,
                                      device=device))
        except BaseException as exc:  # raised again by the caller
            result.append(exc)

    thread = threading.Thread(target=allocate, name='mmsn-tickets')
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _stream_key(device: torch.device) -> Tuple:
    if device.type != 'cuda':
        return (device.type, device.index)
    index = device.index if device.index is not None else \
        torch.cuda.current_device()
    # a plain integer, without building a Stream object
    return ('cuda', index, torch._C._cuda_getCurrentRawStream(index))
