# Batch-size study, GN (32 groups) at (8,32): 8 GPUs x 32 images,
# lr 0.1 (0.1 x 256 / 256); published top-1 75.9.
_base_ = ['../_base_/batch_study/resnet50_gn.py']

train_dataloader = dict(batch_size=32)
optim_wrapper = dict(optimizer=dict(lr=0.1))
auto_scale_lr = dict(base_batch_size=256)
