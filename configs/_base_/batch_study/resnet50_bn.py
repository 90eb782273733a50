# BN row of the batch-size study: BN statistics of each GPU's own batch
# (no sync), as in the paper.
_base_ = ['./resnet50_step.py']

model = dict(backbone=dict(norm_cfg=dict(type='BN', requires_grad=True)))
