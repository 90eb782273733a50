"""Let mmengine load its own checkpoints under ``weights_only=True``.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7
pickles a few non-tensor objects in its message hub: ``HistoryBuffer`` with
numpy arrays and scalars, and its statistics methods, which pickle as
``getattr(HistoryBuffer, 'min')``. Instead of switching the safe loader off,
exactly those are allowlisted; ``getattr`` only through a stand-in that
resolves HistoryBuffer's statistics methods and nothing else. Any other
pickled object is still refused.
"""
import pickle

import numpy as np
import torch


def _numpy_globals():
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


def mmengine_safe_globals():
    """The globals mmengine 0.10.7 writes into a checkpoint besides tensors.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    return [
        HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
        *_numpy_globals()
    ]


def allow_mmengine_checkpoints() -> None:
    """Allowlist mmengine's checkpoint globals for ``torch.load``
    (idempotent)."""
    allowed = torch.serialization.get_safe_globals()
    missing = [g for g in mmengine_safe_globals() if g not in allowed]
    if missing:
        torch.serialization.add_safe_globals(missing)
