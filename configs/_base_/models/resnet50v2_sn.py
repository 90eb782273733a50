# Pre-activation ResNet-50 with SN (the authors' ``resnetv2sn50``).
_base_ = ['./resnet50_sn.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='PreActResNet',
        depth=50,
        out_indices=(3, ),
        norm_cfg=dict(type='SN', requires_grad=True),
        zero_init_residual=False))
