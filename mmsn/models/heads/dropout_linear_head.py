"""Linear classifier with dropout before it, as in the SN authors' ResNets."""
from typing import Optional, Tuple, Union

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
        loss (dict): Config of the classification loss.
            Defaults to ``dict(type='CrossEntropyLoss', loss_weight=1.0)``.
        topk (int | tuple[int]): Top-k accuracies to compute.
            Defaults to ``(1, )``.
        cal_acc (bool): Whether to compute the accuracy in training.
            Defaults to False.
        init_cfg (dict, optional): Initialization config.
            Defaults to ``dict(type='Normal', layer='Linear', std=0.01)``.

    The last four are :class:`LinearClsHead`'s, with its defaults.
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 dropout_rate: float = 0.5,
                 loss: dict = dict(type='CrossEntropyLoss', loss_weight=1.0),
                 topk: Union[int, Tuple[int, ...]] = (1, ),
                 cal_acc: bool = False,
                 init_cfg: Optional[dict] = dict(
                     type='Normal', layer='Linear', std=0.01)):
        super().__init__(
            num_classes,
            in_channels,
            init_cfg=init_cfg,
            loss=loss,
            topk=topk,
            cal_acc=cal_acc)
        self.dropout_rate = dropout_rate
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        # pre_logits stays dropout-free: features extracted with
        # ``extract_feat(stage='pre_logits')`` are deterministic.
        return self.fc(self.dropout(self.pre_logits(feats)))
