from . import backbones, heads  # noqa: F401  (register in mmpretrain)
from .norms import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                    SparseSwitchableNorm3d, SwitchableNorm1d,
                    SwitchableNorm2d, SwitchableNorm3d,
                    SyncSparseSwitchableNorm, SyncSwitchableNorm)

__all__ = [
    'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm', 'SparseSwitchableNorm1d', 'SparseSwitchableNorm2d',
    'SparseSwitchableNorm3d', 'SyncSparseSwitchableNorm'
]
