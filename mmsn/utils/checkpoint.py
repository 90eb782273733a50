"""Let mmengine load its own checkpoints under ``weights_only=True``.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7
pickles a few non-tensor objects in its message hub: ``HistoryBuffer`` with
numpy arrays and scalars, and its statistics methods, which pickle as
``getattr(HistoryBuffer, 'min')``. Instead of switching the safe loader off,
exactly those are allowed, and only while mmengine loads a checkpoint
(``CheckpointLoader.load_checkpoint``, which every mmengine loader goes
through: ``load_from``, ``resume``, ``init_cfg=dict(type='Pretrained')``,
``load_checkpoint``); ``getattr`` only through a stand-in that resolves
HistoryBuffer's statistics methods and nothing else. Any other pickled
object is still refused, and other ``torch.load`` calls are not affected.
"""
import contextlib
import pickle
from typing import Iterator, List

import numpy as np
import torch

from .patches import Patch, Replacement, is_patched, replace, wraps_as


def numpy_safe_globals() -> list:
    """numpy arrays and scalars of the common dtypes."""
    core = np._core if hasattr(np, '_core') else np.core
    dtypes = [
        type(np.dtype(t))
        for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                  np.bool_)
    ]
    return [
        core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray,
        np.dtype, *dtypes
    ]


_DEFAULT_STATISTICS = {'min', 'max', 'current', 'mean'}


def _history_buffer_getattr(obj, name):
    """``getattr`` restricted to what mmengine pickles: the statistics
    methods of ``HistoryBuffer`` (min, max, current, mean, ...)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    # the defaults are registered lazily, on the first HistoryBuffer
    allowed = set(HistoryBuffer._statistics_methods) | _DEFAULT_STATISTICS
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint: '
        f'only HistoryBuffer statistics methods are allowed')


def mmengine_safe_globals() -> list:
    """The globals mmengine 0.10.7 writes into a checkpoint besides tensors.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    return [
        HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
        *numpy_safe_globals()
    ]


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Allow :func:`mmengine_safe_globals` in ``torch.load(weights_only=True)``
    inside the ``with`` block only.

    Globals that were allowed before stay allowed afterwards (torch's own
    ``safe_globals`` context would remove them on exit).
    """
    allowed = torch.serialization.get_safe_globals()
    missing = [g for g in mmengine_safe_globals() if g not in allowed]
    with torch.serialization.safe_globals(missing):
        yield


def _patch_checkpoint_loader(name: str) -> List[Replacement]:
    from mmengine.runner.checkpoint import CheckpointLoader
    raw = vars(CheckpointLoader)['load_checkpoint']
    if is_patched(raw, name):
        return []
    original = raw.__func__

    @wraps_as(name, original)
    def load_checkpoint(cls, filename, map_location=None, logger='current'):
        with mmengine_checkpoint_globals():
            return original(cls, filename, map_location, logger)

    return [
        replace(CheckpointLoader, 'load_checkpoint',
                classmethod(load_checkpoint))
    ]


PATCHES = [
    Patch(
        'checkpoint-loading',
        'mmengine.runner.checkpoint.CheckpointLoader.load_checkpoint',
        'mmengine can load_from/resume its own checkpoints under torch >= '
        '2.6 with weights_only=True: the types it pickles are allowed '
        'during its loads only', _patch_checkpoint_loader),
]

__all__ = [
    'PATCHES', 'mmengine_checkpoint_globals', 'mmengine_safe_globals',
    'numpy_safe_globals'
]
