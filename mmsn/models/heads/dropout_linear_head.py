"""Linear classifier with dropout before it, as in the SN authors' ResNets."""
from typing import Tuple

import torch
from torch import nn

from mmpretrain.models.heads import LinearClsHead
from mmpretrain.registry import MODELS


@MODELS.register_module()
class DropoutLinearClsHead(LinearClsHead):
    """Linear classifier head with dropout on the pooled feature.

    The SN model zoo (``resnetv1sn*``, ``resnetv2sn*``) applies dropout with
    p=0.5 between the global average pool and ``fc``; mmpretrain's
    :class:`LinearClsHead` has no dropout. ``fc`` keeps its name, so the
    authors' ``fc.weight`` maps to ``head.fc.weight``.

    Args:
        num_classes (int): Number of categories.
        in_channels (int): Number of channels of the pooled feature.
        dropout_rate (float): Probability of zeroing an element in training.
            Defaults to 0.5.
        **kwargs: Passed to :class:`LinearClsHead` (``loss``, ``topk``,
            ``init_cfg``, ...).
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 dropout_rate: float = 0.5,
                 **kwargs):
        super().__init__(num_classes, in_channels, **kwargs)
        self.dropout_rate = dropout_rate
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        # pre_logits stays dropout-free: features extracted with
        # ``extract_feat(stage='pre_logits')`` are deterministic.
        return self.fc(self.dropout(self.pre_logits(feats)))
