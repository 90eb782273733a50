import importlib

from .convert import convert_switchable_norm
from .norms import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                    SparseSwitchableNorm3d, SwitchableNorm1d,
                    SwitchableNorm2d, SwitchableNorm3d,
                    SyncSparseSwitchableNorm, SyncSwitchableNorm)

__all__ = [
    'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm', 'SparseSwitchableNorm1d', 'SparseSwitchableNorm2d',
    'SparseSwitchableNorm3d', 'SyncSparseSwitchableNorm',
    'convert_switchable_norm'
]

# ``backbones`` and ``heads`` import mmpretrain (seconds): on first use only
# (see mmsn.registry).
_LAZY_SUBMODULES = ('backbones', 'heads')


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
