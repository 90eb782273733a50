# The digits demo with Sparse Switchable Normalization: the SN demo's model
# and schedule, SSN layers and SSN's recipe. Every norm layer ends having
# picked one of IN, LN, BN for its mean and one for its variance:
#   python tools/train.py configs/demo/resnet_ssn_digits.py
_base_ = ['./resnet_sn_digits.py']

model = dict(
    backbone=dict(
        # 360 iterations: the ImageNet momentum 0.003 would leave the running
        # statistics a third at their initial values; SN2d's 0.1 does not.
        # Moving averages as in the SSN recipe (the SN demo's batch average
        # is for mixed shares with a large BN part; SSN layers end one-hot).
        norm_cfg=dict(
            type='SSN',
            momentum=0.1,
            moving_average=True,
            requires_grad=True)))

optim_wrapper = dict(
    constructor='GroupClipOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={
        '.mean_weight':
        dict(lr_mult=0.1, decay_mult=0.0, max_grad_norm=1.0),
        '.var_weight':
        dict(lr_mult=0.1, decay_mult=0.0, max_grad_norm=1.0),
    }))

custom_hooks = [
    dict(type='SSNRadiusHook'),
    dict(type='SNImportanceLoggerHook', interval=45),
    dict(type='RNGStateHook'),
]
