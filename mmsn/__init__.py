"""mmsn: Switchable Normalization for OpenMMLab.

Importing the package (e.g. via ``custom_imports=dict(imports=['mmsn'])``)
registers the SN and SSN layers in MMEngine's root ``MODELS`` registry, the
hooks in ``HOOKS``, and makes mmengine/mmcv's BN-only helpers and checkpoint
loading work with SN (see :mod:`mmsn.utils`).
"""
from .version import __version__
from .models import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                     SparseSwitchableNorm3d, SwitchableNorm1d,
                     SwitchableNorm2d, SwitchableNorm3d,
                     SyncSparseSwitchableNorm, SyncSwitchableNorm)
from .ops import switchable_norm
from .utils import allow_mmengine_checkpoints, apply_patches
from . import datasets, engine  # noqa: F401  (registers datasets, hooks)

apply_patches()
allow_mmengine_checkpoints()

__all__ = [
    '__version__', 'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm', 'SparseSwitchableNorm1d', 'SparseSwitchableNorm2d',
    'SparseSwitchableNorm3d', 'SyncSparseSwitchableNorm', 'switchable_norm'
]
