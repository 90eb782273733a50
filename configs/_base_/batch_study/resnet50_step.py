# The protocol shared by every cell of the paper's batch-size study
# (ResNet-50 on ImageNet, Table 1 of Luo et al. 2019): the zoo's step recipe
# (SGD momentum 0.9, weight decay 1e-4, 100 epochs, lr x0.1 at 30/60/90,
# zero-init of the last norm in each block, dropout 0.5, PCA lighting).
# Only the norm layer, the per-GPU batch, the GPU count (base_batch_size)
# and the linearly scaled lr (0.1 per 256 images) change between cells.
_base_ = [
    '../models/resnet50_sn.py',
    '../datasets/imagenet_bs32_lighting.py',
    'mmpretrain::_base_/schedules/imagenet_bs256.py',
    '../default_runtime.py',
]

model = dict(backbone=dict(zero_init_residual=True))
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[30, 60, 90], gamma=0.1)
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
auto_scale_lr = dict(base_batch_size=256)
