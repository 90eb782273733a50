"""Implementations of SN's big-tensor passes (see :mod:`.base`), and the
choice of one per call.

Paths (the values of ``MMSN_SN_PATH``, read when mmsn is imported):

* ``compiled``: ``mmsn._C``, CPU tensors; the CPU default when it loads;
* ``native``: PyTorch's GroupNorm/BatchNorm kernels on views of the rows;
  the CPU default when ``mmsn._C`` is missing (with a one-time warning
  unless ``MMSN_WITH_OPS=0``);
* ``triton``: Triton kernels (``mmsn.ops.backends.triton``, imported on
  first use); the CUDA default when it imports; CPU tensors need
  ``TRITON_INTERPRET=1``;
* ``generic``: device-agnostic PyTorch ops; CUDA without Triton and every
  other device;
* ``composite``: no backend: plain autograd over the equations
  (:mod:`mmsn.ops.composite`), which also serves tracing and export.

Unset or empty picks by device as listed; any other value is an error.
"""
import contextlib
import importlib
import os
import warnings
from typing import Dict, Iterator, Optional, Union

import torch
from torch import Tensor

from .._extension import load_compiled_ops
from .base import RowBackend
from .compiled import CompiledBackend
from .generic import GenericBackend
from .native import NativeBackend

PATHS = ('composite', 'native', 'generic', 'triton', 'compiled')
COMPOSITE = 'composite'


def _check_path(path: Optional[str]) -> str:
    path = (path or '').strip()
    if path and path not in PATHS:
        raise ValueError(f'MMSN_SN_PATH={path!r} is not a path of SN; '
                         f'use one of {", ".join(PATHS)} (or leave it unset '
                         'to choose by device)')
    return path


# '' = choose by device
_forced_path = _check_path(os.environ.get('MMSN_SN_PATH'))
_generic = GenericBackend()
_native = NativeBackend()
# loaded on first use: compiled {'backend', 'error'}, triton likewise
_compiled: Dict[str, object] = {}
_triton: Dict[str, object] = {}
_warned_native = False


@contextlib.contextmanager
def forced(path: Optional[str]) -> Iterator[None]:
    """Use ``path`` (one of :data:`PATHS`, or None / '' to choose by device)
    for every call inside the block, as ``MMSN_SN_PATH`` would."""
    global _forced_path
    saved, _forced_path = _forced_path, _check_path(path)
    try:
        yield
    finally:
        _forced_path = saved


def forced_path() -> str:
    """The path forced by ``MMSN_SN_PATH`` or :func:`forced` ('' if none).
    """
    return _forced_path


def _compiled_backend() -> Optional[CompiledBackend]:
    if not _compiled:
        ops, error = load_compiled_ops()
        _compiled['backend'] = None if ops is None else CompiledBackend(ops)
        _compiled['error'] = error
    return _compiled['backend']


def compiled_ops():
    """The ``torch.ops.mmsn`` namespace when mmsn._C loaded, else None."""
    backend = _compiled_backend()
    return None if backend is None else backend.ops


def compiled_kernels_available() -> bool:
    """Whether the CPU kernels of ``mmsn._C`` were built and loaded."""
    return _compiled_backend() is not None


def _triton_backend() -> Optional[RowBackend]:
    if not _triton:
        try:
            module = importlib.import_module(f'{__name__}.triton')
            _triton['backend'] = module.TritonBackend()
            _triton['error'] = None
        except Exception as err:  # any failure means no Triton here
            _triton['backend'] = None
            _triton['error'] = f'{type(err).__name__}: {err}'
    return _triton['backend']


def triton_backend() -> Optional[RowBackend]:
    """The Triton backend, or None where it cannot be imported."""
    return _triton_backend()


def _triton_interpreted() -> bool:
    module = importlib.import_module(f'{__name__}.triton')
    return module.kernels_interpreted()


def _warn_native_once() -> None:
    global _warned_native
    if _warned_native or os.environ.get('MMSN_WITH_OPS') == '0':
        return
    _warned_native = True
    # the reason says what is missing, what it costs and how to silence it
    warnings.warn(_compiled['error'], RuntimeWarning, stacklevel=4)


def _native_warned() -> NativeBackend:
    _warn_native_once()
    return _native


def default_path(device: Union[torch.device, str]) -> str:
    """The path tensors on ``device`` take when none is forced."""
    return _default_path(torch.device(device))


def _default_path(device: torch.device) -> str:
    if device.type == 'cpu':
        if _compiled_backend() is not None:
            return 'compiled'
        return _native_warned().name
    if device.type == 'cuda' and _triton_backend() is not None:
        return 'triton'
    return 'generic'


def _backend(path: str, device: torch.device) -> RowBackend:
    """The backend of ``path``; a clear error where it cannot run."""
    if path == 'compiled':
        if device.type != 'cpu':
            raise RuntimeError('MMSN_SN_PATH=compiled: mmsn._C has CPU '
                               f'kernels only, got a {device.type} tensor')
        if _compiled_backend() is None:
            raise RuntimeError('MMSN_SN_PATH=compiled: mmsn._C could not be '
                               f'loaded ({_compiled["error"]})')
        return _compiled['backend']
    if path == 'triton':
        if _triton_backend() is None:
            raise RuntimeError('MMSN_SN_PATH=triton: mmsn.ops.backends.triton '
                               f'could not be imported ({_triton["error"]})')
        if device.type == 'cpu' and not _triton_interpreted():
            raise RuntimeError('MMSN_SN_PATH=triton on a CPU tensor needs '
                               'TRITON_INTERPRET=1 (Triton\'s interpreter) '
                               'set before triton is imported')
        return _triton['backend']
    return _native if path == 'native' else _generic


def backend_name(device: Union[torch.device, str]) -> str:
    """The path a float32 tensor on ``device`` takes now (one of
    :data:`PATHS`). Raises the error its use would raise when a forced path
    is unavailable."""
    device = torch.device(device)
    path = _forced_path or _default_path(device)
    if path == COMPOSITE:
        return path
    if device.type == 'meta':
        return _generic.name
    _backend(path, device)  # raises where the path cannot run
    return path


def select(x: Tensor) -> Optional[RowBackend]:
    """The backend for ``x``, or None for the composite path."""
    device = x.device
    if not _forced_path and device.type == 'cpu':
        # the common case first: one dictionary look-up
        return _compiled_backend() or _native_warned()
    path = _forced_path or _default_path(device)
    if path == COMPOSITE:
        return None
    if device.type == 'meta':
        # shapes only (model-size tools, deferred init): the generic ops
        # have meta kernels, whatever path is forced
        return _generic
    backend = _backend(path, device)
    if x.dtype == torch.float64 and x.dtype not in backend.input_dtypes:
        # never compute float64 input in lower precision (Triton's kernels
        # are float32)
        return _generic
    return backend


__all__ = [
    'PATHS', 'RowBackend', 'CompiledBackend', 'NativeBackend',
    'GenericBackend', 'select', 'forced', 'forced_path', 'backend_name',
    'compiled_kernels_available', 'triton_backend'
]
