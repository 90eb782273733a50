# ResNet50v1+SSN (8,32): Sparse Switchable Normalization (Shao et al.,
# CVPR 2019) under the SN zoo's step recipe: 8 GPUs x 32 images, lr 0.1,
# 100 epochs, lr x0.1 at epochs 30, 60 and 90, last_gamma, moving-average
# BN statistics (SSN's momentum 0.003, the authors' 0.997).
# Published: 77.25 top-1.
_base_ = ['./resnet50_sn_8xb32_step.py']

model = dict(
    backbone=dict(
        # mmpretrain's ResNet with the SSN authors' stem pooling (padding 0,
        # ceil_mode), which their checkpoints need
        type='ResNetStemPool',
        stem_pool=dict(kernel_size=3, stride=2, padding=0, ceil_mode=True),
        norm_cfg=dict(type='SSN', requires_grad=True)))

# SSN's recipe for the importance parameters: lr x0.1, no weight decay, and
# their gradient clipped to norm 1 (jointly) before each step.
optim_wrapper = dict(
    constructor='GroupClipOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={
        '.mean_weight':
        dict(lr_mult=0.1, decay_mult=0.0, max_grad_norm=1.0),
        '.var_weight':
        dict(lr_mult=0.1, decay_mult=0.0, max_grad_norm=1.0),
    }))

# SparsestMax radius from 0 to 1 over the whole training, every iteration.
custom_hooks = [dict(type='SSNRadiusHook')]
