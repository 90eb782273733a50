from .checkpoint import mmengine_checkpoint_globals
from .norm_types import check_norm_cfg, check_norm_cfgs, suggest_norm_types
from .patches import (ENV_VAR, apply_patches, applied_patches,
                      available_patches, remove_patches)

__all__ = [
    'ENV_VAR', 'apply_patches', 'applied_patches', 'available_patches',
    'check_norm_cfg', 'check_norm_cfgs', 'mmengine_checkpoint_globals',
    'remove_patches', 'suggest_norm_types'
]
