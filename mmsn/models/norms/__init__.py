from .sparse_switchable_norm import (SparseSwitchableNorm1d,
                                     SparseSwitchableNorm2d,
                                     SparseSwitchableNorm3d,
                                     SyncSparseSwitchableNorm)
from .switchable_norm import (SwitchableNorm1d, SwitchableNorm2d,
                              SwitchableNorm3d)
from .sync_switchable_norm import SyncSwitchableNorm

__all__ = [
    'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm', 'SparseSwitchableNorm1d', 'SparseSwitchableNorm2d',
    'SparseSwitchableNorm3d', 'SyncSparseSwitchableNorm'
]
