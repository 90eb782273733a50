"""Reading a layer's ``nonfinite`` counter back
(mmsn/models/norms/nonfinite.py): which message each slot gives, the count
"in N ... since the last report", that only growth is reported, and when a
layer reports (after each CPU forward, and on a train/eval switch only)."""
import math
import warnings

import pytest
import torch

from mmsn import SparseSwitchableNorm2d, SwitchableNorm2d
from mmsn.models.norms.nonfinite import NonFiniteReport, nonfinite_message
from mmsn.ops.statistics import (NONFINITE_EVAL, NONFINITE_INPUT,
                                 NONFINITE_POOLED, OVERFLOWED)

C = 3
# what tells each slot's message from the others'
SLOT_PHRASES = {
    NONFINITE_INPUT: ('non-finite batch statistics (NaN or Inf in the input)',
                      'training batches'),
    OVERFLOWED: ('overflowed float32 although the input is finite',
                 'training batches'),
    NONFINITE_EVAL: ('in eval mode', 'eval forwards'),
    NONFINITE_POOLED: ('pooled across processes', 'training batches'),
}


def _limit(dtype):
    return f'{math.sqrt(torch.finfo(dtype).max):.2g}'


@pytest.mark.parametrize('slot', list(SLOT_PHRASES))
def test_each_slot_has_its_own_message(slot):
    phrase, _ = SLOT_PHRASES[slot]
    message = nonfinite_message('Layer', slot, 1, torch.float32)
    assert message.startswith('Layer: ')
    assert phrase in message
    for other, (other_phrase, _) in SLOT_PHRASES.items():
        if other != slot:
            assert other_phrase not in message, other


@pytest.mark.parametrize('slot', list(SLOT_PHRASES))
@pytest.mark.parametrize('count', [1, 2, 7])
def test_count_is_said_unless_it_is_one(slot, count):
    _, what = SLOT_PHRASES[slot]
    message = nonfinite_message('L', slot, count, torch.float32)
    said = f' in {count} {what} since the last report'
    assert (said in message) == (count != 1)
    assert 'since the last report' in message or count == 1


@pytest.mark.parametrize('dtype,stats', [(torch.float32, torch.float32),
                                         (torch.float16, torch.float32),
                                         (torch.bfloat16, torch.float32),
                                         (torch.float64, torch.float64)])
@pytest.mark.parametrize('slot', [OVERFLOWED, NONFINITE_EVAL])
def test_overflow_limits_are_the_statistics_dtype_s(dtype, stats, slot):
    """Statistics are float32 for half precision input, float64 for
    float64: the messages name that dtype and sqrt of its largest value."""
    message = nonfinite_message('L', slot, 1, dtype)
    name = str(stats).replace('torch.', '')
    assert name in message
    assert _limit(stats) in message
    other = torch.float64 if stats == torch.float32 else torch.float32
    assert _limit(other) not in message


def test_unknown_slot_is_an_error():
    with pytest.raises(ValueError, match='no non-finite slot 4'):
        nonfinite_message('L', 4, 1, torch.float32)


def _poll(report, counter, dtype=None, name='L'):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        report.poll(name, counter, dtype)
    assert all(w.category is RuntimeWarning for w in caught)
    return [str(w.message) for w in caught]


def test_poll_reports_only_what_grew_with_the_growth_counted():
    report = NonFiniteReport()
    counter = torch.zeros(4, dtype=torch.long)
    assert _poll(report, counter) == []
    counter[NONFINITE_EVAL] += 1
    assert _poll(report, counter) == [
        nonfinite_message('L', NONFINITE_EVAL, 1, torch.float32)]
    assert _poll(report, counter) == []  # nothing new
    counter[NONFINITE_INPUT] += 3
    counter[NONFINITE_POOLED] += 2
    assert _poll(report, counter, torch.float64) == [
        nonfinite_message('L', NONFINITE_INPUT, 3, torch.float64),
        nonfinite_message('L', NONFINITE_POOLED, 2, torch.float64)]
    # the dtype of the last input stays for polls without one
    counter[OVERFLOWED] += 1
    counter[NONFINITE_EVAL] += 4
    assert _poll(report, counter) == [
        nonfinite_message('L', OVERFLOWED, 1, torch.float64),
        nonfinite_message('L', NONFINITE_EVAL, 4, torch.float64)]
    assert report.reported == [3, 1, 5, 2]


def _forward(layer, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        layer(x)
    return [str(w.message) for w in caught]


def _nan_input(dtype=torch.float32):
    x = torch.randn(2, C, 3, 3, dtype=dtype)
    x[1, 0, 1, 1] = math.nan
    return x


@pytest.mark.parametrize('cls', [SwitchableNorm2d, SparseSwitchableNorm2d])
def test_cpu_layer_reports_each_bad_forward_right_after_it(cls):
    layer = cls(C)
    name = cls.__name__
    for _ in range(2):
        assert _forward(layer, _nan_input()) == [
            nonfinite_message(name, NONFINITE_INPUT, 1, torch.float32)]
    assert _forward(layer, torch.randn(2, C, 3, 3)) == []
    layer.eval()
    assert _forward(layer, _nan_input(torch.float64).float()) == [
        nonfinite_message(name, NONFINITE_EVAL, 1, torch.float32)]
    layer.double()
    assert _forward(layer, _nan_input(torch.float64)) == [
        nonfinite_message(name, NONFINITE_EVAL, 1, torch.float64)]
    assert _forward(layer, torch.randn(2, C, 3, 3, dtype=torch.float64)) == []


def _switch(layer, mode):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        layer.train(mode)
    return [str(w.message) for w in caught]


def test_mode_switch_reports_what_was_counted_and_no_switch_does_not():
    """Counts made where no forward reports them (another device's copy
    not yet read, a compiled graph) are reported when the layer switches
    between training and eval, not on a train() that changes nothing."""
    layer = SwitchableNorm2d(C)
    layer.nonfinite[OVERFLOWED] += 3
    assert _switch(layer, True) == []  # already training
    assert _switch(layer, False) == [
        nonfinite_message('SwitchableNorm2d', OVERFLOWED, 3, torch.float32)]
    layer.nonfinite[NONFINITE_EVAL] += 2
    assert _switch(layer, False) == []  # already in eval
    assert _switch(layer, True) == [
        nonfinite_message('SwitchableNorm2d', NONFINITE_EVAL, 2,
                          torch.float32)]
    assert _switch(layer, False) == []  # reported already
