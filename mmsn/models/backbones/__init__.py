"""SN-ready backbones, registered in mmpretrain's MODELS."""
from .preact_resnet import (PreActBasicBlock, PreActBottleneck, PreActResLayer,
                            PreActResNet)

__all__ = [
    'PreActResNet', 'PreActBasicBlock', 'PreActBottleneck', 'PreActResLayer'
]
