# Batch-size study, GN (32 groups) at (8,8): 8 GPUs x 8 images,
# lr 0.025 (0.1 x 64 / 256); published top-1 76.0.
_base_ = ['../_base_/batch_study/resnet50_gn.py']

train_dataloader = dict(batch_size=8)
optim_wrapper = dict(optimizer=dict(lr=0.025))
auto_scale_lr = dict(base_batch_size=64)
