# PSPNet, ResNet-50-D8 + SN with the torchvision-style 7x7 stem ("r50b", as
# mmseg's own r50b configs), ADE20K 512x512, 4 GPUs x 4 images, 160k iterations.
#
# Switchable Normalization replaces SyncBN in the dilated ResNet backbone
# (output stride 8) and in the decode and auxiliary heads. SN keeps per-GPU
# statistics and mixes them with IN and LN statistics, so it needs no cross-GPU
# synchronisation at a few images per GPU; use norm_cfg=dict(type='SyncSN') to
# pool its BN-branch statistics across GPUs as SyncBN does.
#
# The backbone starts from the ImageNet ResNet-50 v1 + SN checkpoint that
# exists: the authors' resnetv1sn50, converted with
#   python tools/model_converters/sn_to_mmpretrain.py \
#       resnet50v1_sn_best.pth.tar checkpoints/resnet50_sn_8xb32.pth
# or one trained with configs/resnet50_sn_8xb32.py; the `backbone.` keys of
# either load with no missing keys. (mmseg's r50-d8 configs use ResNetV1c's
# deep 3-conv stem, for which no SN ImageNet checkpoint exists.)
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

norm_cfg = dict(type='SN', requires_grad=True)

model = dict(
    pretrained=None,
    backbone=dict(
        type='ResNet',
        norm_cfg=norm_cfg,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/resnet50_sn_8xb32.pth',
            prefix='backbone.')),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
