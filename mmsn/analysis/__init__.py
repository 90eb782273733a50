"""Inspection of trained SN models."""
from .importance import (BN_SHARE_THRESHOLD, LayerImportance, average_shares,
                         batch_average_advice, collect_importance,
                         flagged_layers, format_picks, format_table,
                         importance_scalars, plot_importance, write_csv)

__all__ = [
    'BN_SHARE_THRESHOLD', 'LayerImportance', 'collect_importance',
    'flagged_layers', 'batch_average_advice', 'average_shares',
    'importance_scalars', 'format_table', 'format_picks', 'write_csv',
    'plot_importance'
]
