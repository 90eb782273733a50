# ResNet50v1+SSN (8,16): 8 GPUs x 16 images, lr 0.05 (0.1 x 128 / 256), the
# recipe of resnet50_ssn_8xb32.py otherwise. Published: 76.98 top-1.
_base_ = ['./resnet50_ssn_8xb32.py']

train_dataloader = dict(batch_size=16)
optim_wrapper = dict(optimizer=dict(lr=0.05))
auto_scale_lr = dict(base_batch_size=128)
