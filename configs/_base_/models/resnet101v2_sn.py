# Pre-activation ResNet-101 with SN (the authors' ``resnetv2sn101``).
_base_ = ['./resnet50v2_sn.py']

model = dict(backbone=dict(depth=101))
