"""What a layer call costs the host: dispatched operators, host syncs and
time, measured on the CPU (the CUDA path runs the same Python).

* :func:`count_dispatch` counts every operator a call dispatches (a
  ``TorchDispatchMode`` sees each one) and the host syncs among them:
  ``aten._local_scalar_dense`` is what ``.item()``, ``bool(t)``,
  ``float(t)`` and ``if t:`` call, and on a CUDA tensor each one makes the
  host wait for the GPU.
* :func:`layer_call` runs a layer as a training step (forward and the
  backward of ``y.sum()``) or an eval forward, the unit the counts and
  times are taken of.
* :func:`graph_breaks` asks ``torch._dynamo.explain``.
* :func:`host_profile` says where a call's host time goes, function by
  function (``cProfile``), the backward included (run on the calling
  thread, where the profiler sees it).
* :func:`share_convolutions` makes two models differ only in their norm
  layers, so that timing them compares the norms.

Used by ``tools/analysis/benchmark_norm.py`` and the tests.
"""
import collections
import cProfile
import os
import pstats
import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC = 'aten._local_scalar_dense.default'


class _Counting(TorchDispatchMode):

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_dispatch(fn: Callable[[], object]) -> collections.Counter:
    """Operators dispatched by ``fn()``, by name (``HOST_SYNC``: host
    syncs)."""
    with _Counting() as mode:
        fn()
    return mode.ops


def layer_call(layer: nn.Module, x: Tensor, train: bool) -> Callable[[], None]:
    """One training step of ``layer`` (forward, backward of the output's
    sum; gradients accumulate) or one eval forward without autograd."""
    if train:
        x = x.detach().requires_grad_()

        def step():
            layer(x).sum().backward()
    else:

        def step():
            with torch.no_grad():
                layer(x)

    return step


def layer_costs(layer: nn.Module, x: Tensor,
                train: bool) -> Tuple[int, int, collections.Counter]:
    """``(operators, host syncs, counter)`` of one call after a first one
    (which loads libraries and allocates gradients)."""
    layer.train(train)
    call = layer_call(layer, x, train)
    call()
    ops = count_dispatch(call)
    return sum(ops.values()), ops[HOST_SYNC], ops


def host_times(calls: Dict[str, Callable[[], None]], reps: int = 21,
               inner: int = 200) -> Dict[str, float]:
    """Median microseconds per call of each function, measured in
    ``reps`` rounds of ``inner`` calls, the functions interleaved in
    rotating order (a busy machine slows all alike)."""
    names = list(calls)
    for name in names:
        for _ in range(inner):
            calls[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            fn = calls[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


class ProfileRow(NamedTuple):
    """One function's share of a call's host time."""
    function: str
    calls: float  # per profiled call
    self_us: float  # in the function itself, per profiled call
    total_us: float  # with what it calls, per profiled call


def host_profile(fn: Callable[[], object], reps: int = 50,
                 top: int = 12) -> List[ProfileRow]:
    """The ``top`` functions by their own host time over ``reps`` calls of
    ``fn`` (after one unprofiled call), per call. Autograd runs the
    backward on the calling thread meanwhile (on CUDA it otherwise runs on
    a device thread, which the profiler does not see). The profiler's own
    overhead inflates Python functions alike: compare shares, not totals
    with unprofiled times."""
    fn()
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        for _ in range(reps):
            fn()
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [
        ProfileRow(_function_name(key), calls / reps, own / reps * 1e6,
                   total / reps * 1e6)
        for key, (_, calls, own, total, _) in stats.items()
    ]
    rows.sort(key=lambda r: r.self_us, reverse=True)
    return rows[:top]


def _function_name(key: Tuple[str, int, str]) -> str:
    """``package/module.py:line(function)``, or a builtin's name."""
    path, line, name = key
    if path == '~':  # a builtin: name is '<built-in method ...>'
        return name
    parts = path.split(os.sep)
    for root in ('mmsn', 'torch', 'triton', 'mmengine', 'mmpretrain'):
        if root in parts:
            parts = parts[len(parts) - 1 - parts[::-1].index(root):]
            break
    else:
        parts = parts[-1:]
    return f'{"/".join(parts)}:{line}({name})'


def share_convolutions(model: nn.Module, like: nn.Module) -> None:
    """Give ``model`` the convolutions and linear layers of ``like`` (the
    same modules, found by name), so that the two differ only in their
    norm layers. Timed apart, two copies of a network run their
    convolutions at speeds that differ by up to 4% between processes (where
    each copy's weights lie in memory), more than SN costs a host-bound
    ResNet-50."""
    shared = dict(like.named_modules())
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            parent, _, attr = name.rpartition('.')
            setattr(model.get_submodule(parent), attr, shared[name])


def graph_breaks(fn: Callable, args: tuple) -> Tuple[int, List[str]]:
    """Graph breaks ``torch.compile`` would make in ``fn(*args)``, and their
    reasons."""
    import torch._dynamo
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_break_count, [
        str(b.reason) for b in explained.break_reasons
    ]


__all__ = [
    'HOST_SYNC', 'count_dispatch', 'layer_call', 'layer_costs', 'host_times',
    'graph_breaks', 'ProfileRow', 'host_profile', 'share_convolutions'
]
