from .batch_average_hook import SNBatchAverageHook
from .importance_logger_hook import SNImportanceLoggerHook
from .rng_state_hook import RNGStateHook
from .ssn_radius_hook import SSNRadiusHook

__all__ = [
    'SNBatchAverageHook', 'SNImportanceLoggerHook', 'RNGStateHook',
    'SSNRadiusHook'
]
