from . import checkpoint, compat
from .checkpoint import mmengine_checkpoint_globals
from .norm_types import check_norm_cfg, check_norm_cfgs, suggest_norm_types
from .patches import (ENV_VAR, apply_patches, applied_patches,
                      available_patches, register_patches, remove_patches)

# The patch mechanism knows no patch; the modules that define them are
# wired in here, in the order they are applied.
register_patches([*compat.PATCHES, *checkpoint.PATCHES])

__all__ = [
    'ENV_VAR', 'apply_patches', 'applied_patches', 'available_patches',
    'check_norm_cfg', 'check_norm_cfgs', 'mmengine_checkpoint_globals',
    'register_patches', 'remove_patches', 'suggest_norm_types'
]
