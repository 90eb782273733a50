"""mmpretrain's ResNet with a configurable stem max-pool."""
from typing import List, Optional, Sequence, Union

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
        depth (int): Network depth, from {18, 34, 50, 101, 152}.
        stem_pool (dict, optional): Arguments of the stem ``nn.MaxPool2d``.
            Defaults to mmpretrain's (kernel 3, stride 2, padding 1).

    The other arguments are :class:`mmpretrain.models.ResNet`'s, with its
    defaults; see there.
    """

    def __init__(self,
                 depth: int,
                 stem_pool: Optional[dict] = None,
                 in_channels: int = 3,
                 stem_channels: int = 64,
                 base_channels: int = 64,
                 expansion: Optional[int] = None,
                 num_stages: int = 4,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (3, ),
                 style: str = 'pytorch',
                 deep_stem: bool = False,
                 avg_down: bool = False,
                 frozen_stages: int = -1,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 zero_init_residual: bool = True,
                 init_cfg: Optional[Union[dict, List[dict]]] = [
                     dict(type='Kaiming', layer=['Conv2d']),
                     dict(
                         type='Constant',
                         val=1,
                         layer=['_BatchNorm', 'GroupNorm'])
                 ],
                 drop_path_rate: float = 0.0) -> None:
        super().__init__(
            depth,
            in_channels=in_channels,
            stem_channels=stem_channels,
            base_channels=base_channels,
            expansion=expansion,
            num_stages=num_stages,
            strides=strides,
            dilations=dilations,
            out_indices=out_indices,
            style=style,
            deep_stem=deep_stem,
            avg_down=avg_down,
            frozen_stages=frozen_stages,
            conv_cfg=conv_cfg,
            norm_cfg=norm_cfg,
            norm_eval=norm_eval,
            with_cp=with_cp,
            zero_init_residual=zero_init_residual,
            init_cfg=init_cfg,
            drop_path_rate=drop_path_rate)
        if stem_pool is not None:
            self.maxpool = nn.MaxPool2d(**stem_pool)
