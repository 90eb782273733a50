"""Deploy trained SSN/SN models as plain networks (see
``tools/deploy/collapse_norms.py``)."""
from .checkpoint import collapse_checkpoint
from .collapse import (CollapseError, LayerPick, collapse_model,
                       plan_collapse)
from .config import collapsed_config

__all__ = [
    'CollapseError', 'LayerPick', 'plan_collapse', 'collapse_model',
    'collapsed_config', 'collapse_checkpoint'
]
