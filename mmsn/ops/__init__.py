from .switchable_norm import (batch_stats_from_instance,
                              compiled_kernels_available, in_var_correction,
                              layer_stats_from_instance, mix_statistics,
                              switchable_norm)

__all__ = [
    'switchable_norm', 'mix_statistics', 'batch_stats_from_instance',
    'layer_stats_from_instance', 'in_var_correction',
    'compiled_kernels_available'
]
