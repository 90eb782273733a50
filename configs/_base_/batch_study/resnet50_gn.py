# GN row of the batch-size study: Group Normalization with 32 groups.
_base_ = ['./resnet50_step.py']

model = dict(
    backbone=dict(
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)))
