# Batch-size study, SN at (1,8): 1 GPU x 8 images,
# lr 0.003125 (0.1 x 8 / 256); published top-1 75.9.
_base_ = ['../_base_/batch_study/resnet50_sn.py']

train_dataloader = dict(batch_size=8)
optim_wrapper = dict(optimizer=dict(lr=0.003125))
auto_scale_lr = dict(base_batch_size=8)
