# ResNet50v1+SN (8,1): 8 GPUs x 1 image, lr 0.003125 (0.1 x 8 / 256),
# 100 epochs, lr x0.1 at epochs 30, 60 and 90, last_gamma. With one sample
# per GPU the BN statistics equal the IN statistics, so SN mixes IN and LN
# only (using_bn=False, no running statistics).
# Published: 75.94 top-1 / 92.70 top-5.
_base_ = ['./resnet50_sn_8xb32_step.py']

model = dict(
    backbone=dict(norm_cfg=dict(type='SN', using_bn=False,
                                requires_grad=True)))

train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.003125))
auto_scale_lr = dict(base_batch_size=8)
