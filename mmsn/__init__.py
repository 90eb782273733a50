"""mmsn: Switchable Normalization for OpenMMLab.

Importing the package (e.g. via ``custom_imports=dict(imports=['mmsn'])``)
registers the SN and SSN layers in MMEngine's root ``MODELS`` registry and
the hooks in ``HOOKS`` (see :mod:`mmsn.registry`), and applies the patches of
:mod:`mmsn.utils.patches` that make mmengine/mmcv's BN-only helpers and
checkpoint loading work with SN (``MMSN_NO_PATCHES=1`` leaves them out).
"""
import importlib

from .version import __version__, check_dependencies

check_dependencies()    # before anything imports an incompatible package

from .models import (SparseSwitchableNorm1d,  # noqa: E402
                     SparseSwitchableNorm2d, SparseSwitchableNorm3d,
                     SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                     SyncSparseSwitchableNorm, SyncSwitchableNorm,
                     convert_switchable_norm)
from .ops import switchable_norm  # noqa: E402
from . import engine, registry  # noqa: F401,E402  (hooks, builders)
from .utils import apply_patches  # noqa: E402

apply_patches()

__all__ = [
    '__version__', 'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm', 'SparseSwitchableNorm1d', 'SparseSwitchableNorm2d',
    'SparseSwitchableNorm3d', 'SyncSparseSwitchableNorm', 'switchable_norm',
    'convert_switchable_norm'
]

# Imported on first use: they import mmpretrain (seconds); zoo is not
# needed by the layers.
_LAZY_SUBMODULES = ('datasets', 'converters', 'zoo')


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
