# ResNet50v1+SSN (8,4): 8 GPUs x 4 images, lr 0.0125 (0.1 x 32 / 256), the
# recipe of resnet50_ssn_8xb32.py otherwise. Published: 76.07 top-1.
_base_ = ['./resnet50_ssn_8xb32.py']

train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))
auto_scale_lr = dict(base_batch_size=32)
