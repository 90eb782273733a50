from .hooks import SNBatchAverageHook, SNImportanceLoggerHook

__all__ = ['SNBatchAverageHook', 'SNImportanceLoggerHook']
