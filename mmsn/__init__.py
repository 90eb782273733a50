"""mmsn: Switchable Normalization for OpenMMLab.

Importing the package (e.g. via ``custom_imports=dict(imports=['mmsn'])``)
registers the SN layers in MMEngine's root ``MODELS`` registry, the hooks in
``HOOKS``, and makes mmengine/mmcv's BN-only helpers and checkpoint loading
work with SN (see :mod:`mmsn.utils`).
"""
from .version import __version__, check_dependencies

check_dependencies()    # before anything imports an incompatible package

from .models import (SwitchableNorm1d, SwitchableNorm2d,  # noqa: E402
                     SwitchableNorm3d, SyncSwitchableNorm)
from .ops import switchable_norm  # noqa: E402
from .utils import allow_mmengine_checkpoints, apply_patches  # noqa: E402
from . import datasets, engine  # noqa: F401,E402  (registers datasets, hooks)

apply_patches()
allow_mmengine_checkpoints()

__all__ = [
    '__version__', 'SwitchableNorm1d', 'SwitchableNorm2d', 'SwitchableNorm3d',
    'SyncSwitchableNorm', 'switchable_norm'
]
