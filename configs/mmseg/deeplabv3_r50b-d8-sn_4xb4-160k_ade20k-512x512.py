# DeepLabV3, ResNet-50-D8 + SN with the 7x7 stem ("r50b", as mmseg's r50b
# configs), ADE20K 512x512, 4 GPUs x 4 images, 160k iterations.
# SN replaces SyncBN in the backbone and the decode/auxiliary heads
# (norm_cfg=dict(type='SyncSN') pools the BN-branch statistics across GPUs).
# The backbone starts from the authors' resnetv1sn50 converted by
# tools/model_converters/sn_to_mmpretrain.py (README.md, "The authors'
# checkpoints"); mmseg's r50-d8 deep stem has no SN ImageNet checkpoint.
_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-160k_ade20k-512x512.py'

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
