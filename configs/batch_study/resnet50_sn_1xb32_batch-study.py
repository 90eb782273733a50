# Batch-size study, SN at (1,32): 1 GPU x 32 images,
# lr 0.0125 (0.1 x 32 / 256); published top-1 76.6.
_base_ = ['../_base_/batch_study/resnet50_sn.py']

train_dataloader = dict(batch_size=32)
optim_wrapper = dict(optimizer=dict(lr=0.0125))
auto_scale_lr = dict(base_batch_size=32)
