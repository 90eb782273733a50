"""Pre-activation ResNet ("ResNet v2"), norm-agnostic.

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016), in the
layout of the SN authors' ``resnetv2sn`` models, so that their checkpoints map
onto it name by name. Every block is ``norm -> ReLU -> conv`` (two times in
:class:`PreActBasicBlock`, three times in :class:`PreActBottleneck`); the
shortcut of a block that changes shape is a single 1x1 conv applied to the
*pre-activated* input (the output of the block's first norm + ReLU) and has
no norm; the stem is ``conv1 -> norm1 -> ReLU -> maxpool``; a final
``norm_out -> ReLU`` follows the last stage.

Module names (``<n>`` is the norm's abbreviation from ``build_norm_layer``:
``sn`` for SN/SyncSN, ``bn`` for BN/SyncBN, ``gn`` for GN, ...)::

    conv1                        stem 7x7 conv, stride 2
    <n>1                         stem norm (e.g. ``sn1``), then ReLU, maxpool
    layer{1..4}.{j}.<n>1         first norm of block j (pre-activation)
    layer{1..4}.{j}.conv1        1x1 (bottleneck) or 3x3 (basic) conv
    layer{1..4}.{j}.<n>2         second norm
    layer{1..4}.{j}.conv2        3x3 conv, carries the stage's stride
    layer{1..4}.{j}.<n>3         third norm (bottleneck only)
    layer{1..4}.{j}.conv3        1x1 expansion conv (bottleneck only)
    layer{1..4}.0.downsample.0   1x1 shortcut conv (first block of a stage
                                 whose stride or width changes), no norm
    <n>_out                      final norm after the last stage (``sn_out``)

With ``norm_cfg=dict(type='SN')`` these are the keys of the authors'
``resnetv2sn50`` / ``resnetv2sn101`` state dicts below their ``module.``
prefix (the classifier ``fc`` lives in the head, not in the backbone), except
the shortcut: the authors assign a bare conv (``layerK.0.downsample.weight``),
here it sits in a Sequential as in mmpretrain's ResNets (``downsample.0``);
the converter maps the one onto the other. The
norms are reachable by role as ``norm1`` (stem), ``norm_out`` (final) and
``block.norm1``..``block.norm3``.
"""
from typing import Optional, Sequence, Tuple

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init
from torch.nn.modules.batchnorm import _BatchNorm

from mmpretrain.models.backbones.base_backbone import BaseBackbone
from mmpretrain.registry import MODELS
from mmsn.utils.norm_types import check_norm_cfg


class _PreActBlock(BaseModule):
    """``norm<i> -> ReLU -> conv<i>`` for i = 1, 2, ..., then the shortcut
    added; the shortcut takes the pre-activated input (after norm1 + ReLU).

    Args:
        in_channels (int): Input channels of this block.
        out_channels (int): Output channels of this block.
        mid_channels (int): Channels between the convs.
        convs (Sequence[tuple[int, int]]): ``(kernel size, stride)`` of each
            conv; 3x3 convs take ``dilation`` (and padding to keep the size).
        dilation (int): Dilation of the 3x3 convs.
        downsample (nn.Module, optional): Shortcut applied to the
            pre-activated input; None is the identity.
        with_cp (bool): Use gradient checkpointing to save memory.
        conv_cfg (dict, optional): Config of the conv layers.
        norm_cfg (dict): Config of the norm layers.
        init_cfg (dict, optional): Initialization config.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 mid_channels: int, convs: Sequence[Tuple[int, int]],
                 dilation: int, downsample: Optional[nn.Module],
                 with_cp: bool, conv_cfg: Optional[dict], norm_cfg: dict,
                 init_cfg: Optional[dict]):
        super().__init__(init_cfg=init_cfg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mid_channels = mid_channels
        self.dilation = dilation
        self.with_cp = with_cp
        self.num_convs = len(convs)
        self.norm_names = []
        for i, (kernel_size, stride) in enumerate(convs, 1):
            channels = in_channels if i == 1 else mid_channels
            norm_name, norm = build_norm_layer(norm_cfg, channels, postfix=i)
            self.add_module(norm_name, norm)
            self.norm_names.append(norm_name)
            wide = kernel_size == 3
            conv = build_conv_layer(
                conv_cfg,
                channels,
                out_channels if i == len(convs) else mid_channels,
                kernel_size,
                stride=stride,
                padding=dilation if wide else 0,
                dilation=dilation if wide else 1,
                bias=False)
            self.add_module(f'conv{i}', conv)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def norm1(self):
        return getattr(self, self.norm_names[0])

    @property
    def norm2(self):
        return getattr(self, self.norm_names[1])

    @property
    def last_norm(self):
        """The norm that, zeroed, makes the residual branch output 0."""
        return getattr(self, self.norm_names[-1])

    def _forward(self, x):
        out = self.relu(self.norm1(x))
        # The shortcut takes the pre-activated input, as in the authors' v2.
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        for i in range(2, self.num_convs + 1):
            norm = getattr(self, self.norm_names[i - 1])
            out = getattr(self, f'conv{i}')(self.relu(norm(out)))
        return out + identity

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class PreActBasicBlock(_PreActBlock):
    """Pre-activation basic block: (norm -> ReLU -> 3x3 conv) x 2.

    Args:
        in_channels (int): Input channels of this block.
        out_channels (int): Output channels of this block.
        expansion (int): Ratio of ``out_channels / mid_channels``; always 1
            for the basic block. Defaults to 1.
        stride (int): Stride of the first 3x3 conv. Defaults to 1.
        dilation (int): Dilation of the 3x3 convs. Defaults to 1.
        downsample (nn.Module, optional): Shortcut applied to the
            pre-activated input. Defaults to None (identity).
        with_cp (bool): Use gradient checkpointing to save memory.
            Defaults to False.
        conv_cfg (dict, optional): Config of the conv layers.
            Defaults to None.
        norm_cfg (dict): Config of the norm layers.
            Defaults to ``dict(type='BN')``.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 expansion: int = 1,
                 stride: int = 1,
                 dilation: int = 1,
                 downsample: Optional[nn.Module] = None,
                 with_cp: bool = False,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg: Optional[dict] = None):
        assert expansion == 1
        super().__init__(in_channels, out_channels, out_channels,
                         [(3, stride), (3, 1)], dilation, downsample,
                         with_cp, conv_cfg, norm_cfg, init_cfg)
        self.expansion = expansion
        self.stride = stride


class PreActBottleneck(_PreActBlock):
    """Pre-activation bottleneck: norm -> ReLU -> conv, three times.

    The convs are 1x1, 3x3 (with the stride and dilation) and 1x1 (the
    expansion). The arguments are :class:`PreActBasicBlock`'s, except:

    Args:
        expansion (int): Ratio of ``out_channels / mid_channels``.
            Defaults to 4.
        stride (int): Stride of the 3x3 conv. Defaults to 1.
        dilation (int): Dilation of the 3x3 conv. Defaults to 1.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 expansion: int = 4,
                 stride: int = 1,
                 dilation: int = 1,
                 downsample: Optional[nn.Module] = None,
                 with_cp: bool = False,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg: Optional[dict] = None):
        assert out_channels % expansion == 0
        super().__init__(in_channels, out_channels, out_channels // expansion,
                         [(1, 1), (3, stride), (1, 1)], dilation, downsample,
                         with_cp, conv_cfg, norm_cfg, init_cfg)
        self.expansion = expansion
        self.stride = stride

    @property
    def norm3(self):
        return getattr(self, self.norm_names[2])


class PreActResLayer(nn.Sequential):
    """A stage of pre-activation blocks.

    Args:
        block (nn.Module): Block class.
        num_blocks (int): Number of blocks.
        in_channels (int): Input channels of the stage.
        out_channels (int): Output channels of the stage.
        expansion (int): Expansion of the bottleneck blocks.
        stride (int): Stride of the first block. Defaults to 1.
        conv_cfg (dict, optional): Config of the conv layers.
            Defaults to None.
        dilation (int): Dilation of every block. Defaults to 1.
        with_cp (bool): Activation checkpointing in every block.
            Defaults to False.
        norm_cfg (dict): Config of the norm layers.
            Defaults to ``dict(type='BN')``.
    """

    def __init__(self,
                 block,
                 num_blocks: int,
                 in_channels: int,
                 out_channels: int,
                 expansion: int,
                 stride: int = 1,
                 conv_cfg: Optional[dict] = None,
                 dilation: int = 1,
                 with_cp: bool = False,
                 norm_cfg: dict = dict(type='BN')):
        kwargs = dict(dilation=dilation, with_cp=with_cp, norm_cfg=norm_cfg)
        downsample = None
        if stride != 1 or in_channels != out_channels:
            # A bare conv: in v2 the shortcut has no norm of its own.
            downsample = nn.Sequential(
                build_conv_layer(
                    conv_cfg,
                    in_channels,
                    out_channels,
                    kernel_size=1,
                    stride=stride,
                    bias=False))
        layers = [
            block(
                in_channels=in_channels,
                out_channels=out_channels,
                expansion=expansion,
                stride=stride,
                downsample=downsample,
                conv_cfg=conv_cfg,
                **kwargs)
        ]
        for _ in range(1, num_blocks):
            layers.append(
                block(
                    in_channels=out_channels,
                    out_channels=out_channels,
                    expansion=expansion,
                    conv_cfg=conv_cfg,
                    **kwargs))
        super().__init__(*layers)


@MODELS.register_module()
class PreActResNet(BaseBackbone):
    """Pre-activation ResNet (ResNet v2) backbone.

    Please refer to the `paper <https://arxiv.org/abs/1603.05027>`__ for
    details. The layout follows the SN authors' ``resnetv2sn`` models; see
    the module docstring for the parameter names.

    Args:
        depth (int): Network depth, from {18, 34, 50, 101, 152}.
        in_channels (int): Number of input image channels. Defaults to 3.
        stem_channels (int): Output channels of the stem conv.
            Defaults to 64.
        base_channels (int): Middle channels of the first stage.
            Defaults to 64.
        num_stages (int): Stages of the network. Defaults to 4.
        strides (Sequence[int]): Strides of the first block of each stage.
            Defaults to ``(1, 2, 2, 2)``.
        dilations (Sequence[int]): Dilation of each stage.
            Defaults to ``(1, 1, 1, 1)``.
        out_indices (Sequence[int]): Output from which stages. The output of
            the last stage goes through the final norm + ReLU; the others are
            the raw residual streams, as in any pre-activation network.
            Defaults to ``(3, )``.
        frozen_stages (int): Stages to be frozen (stop grad and set eval
            mode); 0 freezes the stem only, ``num_stages`` also freezes the
            final norm. -1 means not freezing any parameters.
            Defaults to -1.
        conv_cfg (dict, optional): Config of the conv layers.
            Defaults to None.
        norm_cfg (dict): Config of the norm layers, e.g. ``dict(type='SN')``.
            Defaults to ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Whether to set norm layers to eval mode, namely,
            freeze running stats (mean and var). Affects ``_BatchNorm`` and
            its subclasses (SN included) only. Defaults to False.
        with_cp (bool): Use gradient checkpointing in the blocks.
            Defaults to False.
        zero_init_residual (bool): Initialize the gamma of the last norm in
            each block to 0, so that every block starts as the identity (the
            SN authors' ``last_gamma``). Skipped when loading pretrained
            weights through ``init_cfg``. Defaults to False, as in the
            authors' ``resnetv2sn``.
        init_cfg (dict | list[dict], optional): Initialization config.
            Defaults to Kaiming for convs and constant 1 for norms.
    """

    arch_settings = {
        18: (PreActBasicBlock, (2, 2, 2, 2)),
        34: (PreActBasicBlock, (3, 4, 6, 3)),
        50: (PreActBottleneck, (3, 4, 6, 3)),
        101: (PreActBottleneck, (3, 4, 23, 3)),
        152: (PreActBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self,
                 depth: int,
                 in_channels: int = 3,
                 stem_channels: int = 64,
                 base_channels: int = 64,
                 num_stages: int = 4,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (3, ),
                 frozen_stages: int = -1,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 zero_init_residual: bool = False,
                 init_cfg=[
                     dict(type='Kaiming', layer=['Conv2d']),
                     dict(
                         type='Constant',
                         val=1,
                         layer=['_BatchNorm', 'GroupNorm'])
                 ]):
        super().__init__(init_cfg)
        # A typo in the norm type gets the close registered names, not
        # mmcv's "Cannot find None in registry".
        check_norm_cfg(norm_cfg)
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth} for PreActResNet')
        assert 1 <= num_stages <= 4
        assert len(strides) == len(dilations) >= num_stages
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out_indices = [i if i >= 0 else num_stages + i for i in out_indices]
        assert all(0 <= i < num_stages for i in out_indices), \
            f'invalid out_indices {out_indices}'
        self.depth = depth
        self.num_stages = num_stages
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_cfg = norm_cfg
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]
        expansion = 4 if self.block is PreActBottleneck else 1

        self.conv1 = build_conv_layer(
            conv_cfg,
            in_channels,
            stem_channels,
            kernel_size=7,
            stride=2,
            padding=3,
            bias=False)
        self.norm1_name, norm1 = build_norm_layer(
            norm_cfg, stem_channels, postfix=1)
        self.add_module(self.norm1_name, norm1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.res_layers = []
        _in_channels = stem_channels
        _out_channels = base_channels * expansion
        for i, num_blocks in enumerate(self.stage_blocks):
            res_layer = PreActResLayer(
                block=self.block,
                num_blocks=num_blocks,
                in_channels=_in_channels,
                out_channels=_out_channels,
                expansion=expansion,
                stride=strides[i],
                dilation=dilations[i],
                with_cp=with_cp,
                conv_cfg=conv_cfg,
                norm_cfg=norm_cfg)
            layer_name = f'layer{i + 1}'
            self.add_module(layer_name, res_layer)
            self.res_layers.append(layer_name)
            _in_channels = _out_channels
            _out_channels *= 2

        # ``<n>_out`` (``sn_out`` for SN), the authors' name.
        self.norm_out_name, norm_out = build_norm_layer(
            norm_cfg, _in_channels, postfix='_out')
        self.add_module(self.norm_out_name, norm_out)
        self.feat_dim = _in_channels

        self._freeze_stages()

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    @property
    def norm_out(self):
        return getattr(self, self.norm_out_name)

    def _freeze_stages(self):
        frozen = []
        if self.frozen_stages >= 0:
            frozen += [self.conv1, self.norm1]
        frozen += [
            getattr(self, f'layer{i}')
            for i in range(1, min(self.frozen_stages, self.num_stages) + 1)
        ]
        if self.frozen_stages >= self.num_stages:
            frozen.append(self.norm_out)
        for m in frozen:
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def init_weights(self):
        super().init_weights()
        if (isinstance(self.init_cfg, dict)
                and self.init_cfg['type'] == 'Pretrained'):
            return
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, _PreActBlock):
                    # norm -> ReLU -> conv with gamma = beta = 0 gives 0.
                    constant_init(m.last_norm, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.norm1(self.conv1(x))))
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            if i == self.num_stages - 1:
                x = self.relu(self.norm_out(x))
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                # eval() only matters for norms with running statistics.
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
