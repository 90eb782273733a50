from .batch_average_hook import SNBatchAverageHook
from .importance_logger_hook import SNImportanceLoggerHook

__all__ = ['SNBatchAverageHook', 'SNImportanceLoggerHook']
