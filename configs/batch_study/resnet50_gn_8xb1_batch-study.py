# Batch-size study, GN (32 groups) at (8,1): 8 GPUs x 1 image,
# lr 0.003125 (0.1 x 8 / 256); published top-1 75.5.
_base_ = ['../_base_/batch_study/resnet50_gn.py']

train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.003125))
auto_scale_lr = dict(base_batch_size=8)
