"""mmpretrain's ResNet with a configurable stem max-pool."""
from typing import Optional

from mmpretrain.models.backbones import ResNet
from mmpretrain.registry import MODELS
from torch import nn


@MODELS.register_module()
class ResNetStemPool(ResNet):
    """:class:`mmpretrain.models.ResNet` whose stem max-pool takes the given
    ``nn.MaxPool2d`` arguments.

    mmpretrain's stem pools with kernel 3, stride 2, padding 1. The SSN
    authors' ResNet pools with kernel 3, stride 2, padding 0 and
    ``ceil_mode=True``: at 224x224 input both give 56x56 maps, from windows
    shifted by one pixel, so their checkpoints need their pooling to give
    their logits.

    Args:
        stem_pool (dict, optional): Arguments of the stem ``nn.MaxPool2d``.
            Defaults to mmpretrain's (kernel 3, stride 2, padding 1).
        **kwargs: See :class:`mmpretrain.models.ResNet`.
    """

    def __init__(self, depth: int, stem_pool: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(depth, **kwargs)
        if stem_pool is not None:
            self.maxpool = nn.MaxPool2d(**stem_pool)
