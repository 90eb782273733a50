from .norms import (SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                    SyncSwitchableNorm)

__all__ = [
    'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm'
]
