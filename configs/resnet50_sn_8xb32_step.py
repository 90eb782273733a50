# ResNet50v1+SN (8,32), step schedule: 8 GPUs x 32 images, lr 0.1, 100 epochs,
# lr x0.1 at epochs 30, 60 and 90, last_gamma (zero-init of the last norm in
# each block, from the base model). Published: 76.92 top-1 / 93.26 top-5.
_base_ = [
    './_base_/models/resnet50_sn.py',
    './_base_/datasets/imagenet_bs32_lighting.py',
    'mmpretrain::_base_/schedules/imagenet_bs256.py',
    './_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=32)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[30, 60, 90], gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
auto_scale_lr = dict(base_batch_size=256)
