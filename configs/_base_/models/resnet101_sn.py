# ResNet-101 v1 with SN (the authors' ``resnetv1sn101``).
_base_ = ['./resnet50_sn.py']

model = dict(backbone=dict(depth=101))
