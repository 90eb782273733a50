"""Functional core of Switchable Normalization.

``statistics``  per-(n, c) statistics, mixing and their closed-form gradients
``backends/``   implementations of the passes over the big tensor, one chosen
                per call (``MMSN_SN_PATH`` forces one)
``function``    the autograd Function over a backend (the fast path)
``composite``   the plain-autograd path (reference, tracing and export)
``switchable_norm``  the entry points ``mixed_norm`` and ``switchable_norm``,
                and the layer operators' use (``layer_ops_for``)
``library``     the layer operators (``torch.ops.mmsn``): one per pass
``layer_kernels``  their kernels over a backend, for devices without C++
"""
from .backends import backend_name, compiled_kernels_available
from .statistics import (batch_stats_from_instance, in_var_correction,
                         layer_stats_from_instance, mix_statistics,
                         mix_with_shares)
from .switchable_norm import (compile_with_layer_ops, layer_ops_for,
                              mixed_norm, switchable_norm)

__all__ = [
    'switchable_norm', 'mixed_norm', 'mix_statistics', 'mix_with_shares',
    'batch_stats_from_instance', 'layer_stats_from_instance',
    'in_var_correction', 'compiled_kernels_available', 'backend_name',
    'layer_ops_for', 'compile_with_layer_ops'
]
