"""Warnings about non-finite statistics, without making the host wait.

An SN layer decides on the device what a non-finite batch does (its running
statistics keep their last value) and counts it there, in its ``nonfinite``
buffer (slots: :data:`mmsn.ops.statistics.NONFINITE_INPUT` ...). This
reads that count back and warns about what changed since the last read:

* CPU tensors: right after the forward that produced them (there is no
  device to wait for);
* other devices: at a later forward, once a copy made without blocking has
  arrived, and whenever the layer switches between training and eval
  (``model.train()`` / ``model.eval()``); nothing is read inside a
  ``torch.compile``\\ d graph, so there the mode switch reports.
"""
import math
import warnings
from typing import List, Optional

import torch
from torch import Tensor

from mmsn.ops.statistics import (NONFINITE_EVAL, NONFINITE_INPUT,
                                 NONFINITE_POOLED, NONFINITE_SLOTS,
                                 OVERFLOWED, stats_dtype)


def _count(n: int, what: str) -> str:
    return '' if n == 1 else f' in {n} {what} since the last report'


def nonfinite_message(layer_name: str, slot: int, count: int,
                      dtype: torch.dtype) -> str:
    """The warning for ``count`` new events in ``slot`` of a layer whose
    input has ``dtype``."""
    dtype = stats_dtype(dtype)
    stats = str(dtype).replace('torch.', '')
    limit = f'{math.sqrt(torch.finfo(dtype).max):.2g}'
    keep = 'running statistics keep their last value.'
    if slot == NONFINITE_INPUT:
        return (f'{layer_name}: non-finite batch statistics (NaN or Inf in '
                f'the input){_count(count, "training batches")}; {keep}')
    if slot == OVERFLOWED:
        return (f'{layer_name}: the batch statistics overflowed {stats} '
                f'although the input is finite (squared deviations do not '
                f'fit {stats} beyond |x| ~ {limit})'
                f'{_count(count, "training batches")}, so the output does '
                f'not normalize the input; {keep} Scale the input down or '
                f'run this layer in float64.')
    if slot == NONFINITE_EVAL:
        return (f'{layer_name}: non-finite statistics in eval mode (NaN or '
                f'Inf in the input, or |x| beyond ~{limit} in {stats})'
                f'{_count(count, "eval forwards")}, so the output does not '
                f'normalize the input.')
    if slot == NONFINITE_POOLED:
        return (f'{layer_name}: non-finite batch statistics pooled across '
                f'processes (this process\'s input is finite or empty: NaN '
                f'or Inf in another process\'s input, or statistics that '
                f'overflowed){_count(count, "training batches")}; {keep}')
    raise ValueError(f'no non-finite slot {slot}')


class NonFiniteReport:
    """What one layer has reported of its ``nonfinite`` counter."""

    def __init__(self) -> None:
        self.reported: List[int] = [0] * NONFINITE_SLOTS
        self.dtype = torch.float32  # of the last input, for the messages
        self._host: Optional[Tensor] = None
        self._event = None

    def poll(self, layer_name: str, counter: Tensor,
             dtype: Optional[torch.dtype] = None,
             blocking: bool = False) -> None:
        """Warn about counts that grew since the last poll, as far as they
        can be read without waiting (or with, if ``blocking``); ``dtype``:
        of the input just normalized."""
        if dtype is not None:
            self.dtype = dtype
        counts = self._read(counter, blocking)
        if counts is None or counts == self.reported:
            return
        new = [c - r for c, r in zip(counts, self.reported)]
        self.reported = counts
        for slot, n in enumerate(new):
            if n > 0:
                warnings.warn(nonfinite_message(layer_name, slot, n,
                                                self.dtype),
                              RuntimeWarning, stacklevel=5)

    def _read(self, counter: Tensor, blocking: bool) -> Optional[List[int]]:
        if counter.is_cpu:
            return counter.tolist()  # written synchronously: no wait
        device = counter.device.type
        if device == 'meta':
            return None
        if blocking:
            self._event = None
            return counter.tolist()
        if device != 'cuda' or torch.cuda.is_current_stream_capturing():
            return None  # read at the next train()/eval()
        counts = None
        if self._event is not None:
            if not self._event.query():
                return None  # the last copy has not arrived yet
            counts = self._host.tolist()
        if self._host is None:
            self._host = torch.empty(NONFINITE_SLOTS, dtype=counter.dtype,
                                     pin_memory=True)
        self._host.copy_(counter, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return counts
