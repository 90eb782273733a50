from .hooks import (RNGStateHook, SNBatchAverageHook, SNImportanceLoggerHook,
                    SSNRadiusHook)
from .optimizers import GroupClipOptimWrapperConstructor

__all__ = [
    'SNBatchAverageHook', 'SNImportanceLoggerHook', 'RNGStateHook',
    'SSNRadiusHook', 'GroupClipOptimWrapperConstructor'
]
