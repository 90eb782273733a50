# Batch-size study, GN (32 groups) at (1,16): 1 GPU x 16 images,
# lr 0.00625 (0.1 x 16 / 256); published top-1 75.9.
_base_ = ['../_base_/batch_study/resnet50_gn.py']

train_dataloader = dict(batch_size=16)
optim_wrapper = dict(optimizer=dict(lr=0.00625))
auto_scale_lr = dict(base_batch_size=16)
