# Batch-size study, GN (32 groups) at (8,4): 8 GPUs x 4 images,
# lr 0.0125 (0.1 x 32 / 256); published top-1 75.8.
_base_ = ['../_base_/batch_study/resnet50_gn.py']

train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))
auto_scale_lr = dict(base_batch_size=32)
