# PSPNet, ResNetV1c-50-D8 + SN,
# Cityscapes 512x1024, 4 GPUs x 2 images, 80k iterations.
#
# Switchable Normalization replaces SyncBN in the dilated ResNetV1c backbone
# (deep 3-conv stem, output stride 8) and in the decode and auxiliary heads.
# SN keeps per-GPU statistics and mixes them with IN and LN statistics, so it
# needs no cross-GPU synchronisation at a few images per GPU; use
# norm_cfg=dict(type='SyncSN') to pool its BN-branch statistics across GPUs
# as SyncBN does.
#
# The backbone starts from an ImageNet ResNetV1c-50 + SN checkpoint in
# mmseg's ResNetV1c layout (`backbone.stem.{0,1,3,4,6,7}`, like the BN
# weights open-mmlab://resnet50_v1c that mmseg's own configs use). No such SN
# checkpoint is published, and mmpretrain's ResNetV1c names its stem
# differently (ConvModule: `stem.0.conv`, `stem.0.sn`), so its checkpoints
# leave this stem uninitialised. To start from the ImageNet ResNet-50 v1 + SN
# weights that exist (the authors', converted, or configs/resnet50_sn_8xb32.py)
# use the r50b-d8 variant (mmseg's plain ResNet with the 7x7 stem).
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py'

custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

sn_checkpoint = 'checkpoints/resnetv1c50_sn_8xb32.pth'
norm_cfg = dict(type='SN', requires_grad=True)

model = dict(
    pretrained=None,
    backbone=dict(
        norm_cfg=norm_cfg,
        init_cfg=dict(
            type='Pretrained', checkpoint=sn_checkpoint, prefix='backbone.')),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
