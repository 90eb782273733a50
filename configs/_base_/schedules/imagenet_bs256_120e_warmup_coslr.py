# SGD, lr 0.1 for a total batch of 256, momentum 0.9, weight decay 1e-4 on
# every parameter (SN importance weights included); 5 warmup epochs rising
# linearly from 0, then cosine annealing to 0 at epoch 120. Both are stepped
# per iteration. The warmup starts at 1e-6 x lr rather than exactly 0:
# mmengine's LinearLR updates the lr multiplicatively and divides by zero
# on its second step when start_factor is 0.
_base_ = ['mmpretrain::_base_/schedules/imagenet_bs256.py']

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        T_max=115,
        eta_min=0.0,
        by_epoch=True,
        begin=5,
        end=120,
        convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
