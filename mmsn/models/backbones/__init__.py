"""SN-ready backbones, registered in mmpretrain's MODELS.

``ResNetStemPool`` (the SSN authors' stem pooling) lives in
:mod:`mmsn_runtime`, so that collapsed SSN models run without mmsn.
"""
from mmsn_runtime import ResNetStemPool

from .preact_resnet import (PreActBasicBlock, PreActBottleneck, PreActResLayer,
                            PreActResNet)

__all__ = [
    'PreActResNet', 'PreActBasicBlock', 'PreActBottleneck', 'PreActResLayer',
    'ResNetStemPool'
]
