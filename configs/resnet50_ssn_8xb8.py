# ResNet50v1+SSN (8,8): 8 GPUs x 8 images, lr 0.025 (0.1 x 64 / 256), the
# recipe of resnet50_ssn_8xb32.py otherwise. Published: 76.75 top-1.
_base_ = ['./resnet50_ssn_8xb32.py']

train_dataloader = dict(batch_size=8)
optim_wrapper = dict(optimizer=dict(lr=0.025))
auto_scale_lr = dict(base_batch_size=64)
