# Batch-size study, BN at (8,2): 8 GPUs x 2 images,
# lr 0.00625 (0.1 x 16 / 256); published top-1 65.3.
_base_ = ['../_base_/batch_study/resnet50_bn.py']

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.00625))
auto_scale_lr = dict(base_batch_size=16)
