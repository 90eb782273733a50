# Batch-size study, SN at (8,1): 8 GPUs x 1 image,
# lr 0.003125 (0.1 x 8 / 256); published top-1 75.0.
# One sample per GPU: BN statistics would equal the IN ones, so SN mixes
# IN and LN only (using_bn=False), as the paper does.
_base_ = ['../_base_/batch_study/resnet50_sn.py']

model = dict(
    backbone=dict(norm_cfg=dict(type='SN', using_bn=False,
                                requires_grad=True)))

train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.003125))
auto_scale_lr = dict(base_batch_size=8)
