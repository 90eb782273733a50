from .hooks import SNBatchAverageHook

__all__ = ['SNBatchAverageHook']
