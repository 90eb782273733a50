# SN row of the batch-size study: IN, LN and BN statistics mixed.
_base_ = ['./resnet50_step.py']

model = dict(backbone=dict(norm_cfg=dict(type='SN', requires_grad=True)))
