# ResNet-50 v1 with Switchable Normalization, as the SN authors'
# ``resnetv1sn50``: every BN of mmpretrain's ResNet becomes SN, and dropout
# (p=0.5) sits between the global pool and ``fc``.
_base_ = ['mmpretrain::_base_/models/resnet50.py']

# mmsn registers 'SN', PreActResNet and the dropout head.
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        norm_cfg=dict(type='SN', requires_grad=True),
        # The authors' ``last_gamma=True``, set in every v1 row of their zoo
        # (cosine and step): the last norm of each block starts at gamma 0.
        zero_init_residual=True),
    head=dict(type='DropoutLinearClsHead', dropout_rate=0.5))
