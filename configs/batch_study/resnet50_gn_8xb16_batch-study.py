# Batch-size study, GN (32 groups) at (8,16): 8 GPUs x 16 images,
# lr 0.05 (0.1 x 128 / 256); published top-1 75.8.
_base_ = ['../_base_/batch_study/resnet50_gn.py']

train_dataloader = dict(batch_size=16)
optim_wrapper = dict(optimizer=dict(lr=0.05))
auto_scale_lr = dict(base_batch_size=128)
