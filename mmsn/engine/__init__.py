from .hooks import SNBatchAverageHook, SNImportanceLoggerHook, SSNRadiusHook
from .optimizers import GroupClipOptimWrapperConstructor

__all__ = [
    'SNBatchAverageHook', 'SNImportanceLoggerHook', 'SSNRadiusHook',
    'GroupClipOptimWrapperConstructor'
]
