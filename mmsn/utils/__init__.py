from .checkpoint import allow_mmengine_checkpoints
from .compat import apply_patches

__all__ = ['allow_mmengine_checkpoints', 'apply_patches']
