from .hooks import RNGStateHook, SNBatchAverageHook, SNImportanceLoggerHook

__all__ = ['SNBatchAverageHook', 'SNImportanceLoggerHook', 'RNGStateHook']
