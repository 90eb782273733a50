from .batch_average_hook import SNBatchAverageHook

__all__ = ['SNBatchAverageHook']
