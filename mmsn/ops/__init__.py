from .switchable_norm import (batch_stats_from_instance,
                              compiled_kernels_available, in_var_correction,
                              layer_stats_from_instance, mix_statistics,
                              mix_with_shares, mixed_norm, switchable_norm)

__all__ = [
    'switchable_norm', 'mixed_norm', 'mix_statistics', 'mix_with_shares',
    'batch_stats_from_instance', 'layer_stats_from_instance',
    'in_var_correction', 'compiled_kernels_available'
]
