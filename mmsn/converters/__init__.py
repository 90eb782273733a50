"""Converters from the authors' reference checkpoints to mmpretrain's."""
from .sn_checkpoint import (KNOWN_MODELS, ConversionError, ZooModel,
                            authors_name, convert_checkpoint,
                            convert_state_dict, detect_using_bn,
                            expected_model_cfg, suggested_config)

__all__ = [
    'KNOWN_MODELS', 'ConversionError', 'ZooModel', 'authors_name',
    'convert_checkpoint', 'convert_state_dict', 'detect_using_bn',
    'expected_model_cfg', 'suggested_config'
]
