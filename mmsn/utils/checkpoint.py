"""Let mmengine load its own checkpoints under ``weights_only=True``.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7
pickles a few non-tensor objects (the message hub's ``HistoryBuffer`` with its
numpy arrays). Instead of switching the safe loader off, exactly those types
are allowlisted; any other pickled object is still refused.
"""
import numpy as np
import torch


def _numpy_globals():
    multiarray = getattr(np, '_core', None)
    multiarray = multiarray.multiarray if multiarray is not None \
        else np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64,
                                           np.int32, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *dtypes]


def mmengine_safe_globals():
    """The types mmengine 0.10.7 writes into a checkpoint besides tensors."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, *_numpy_globals()]


def allow_mmengine_checkpoints() -> None:
    """Allowlist mmengine's checkpoint types for ``torch.load`` (idempotent).
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())
