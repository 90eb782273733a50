from . import backbones, heads  # noqa: F401  (register in mmpretrain)
from .norms import (SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                    SyncSwitchableNorm)

__all__ = [
    'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm'
]
