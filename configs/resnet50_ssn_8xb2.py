# ResNet50v1+SSN (8,2): 8 GPUs x 2 images, lr 0.00625 (0.1 x 16 / 256), the
# recipe of resnet50_ssn_8xb32.py otherwise. Published: 75.85 top-1.
_base_ = ['./resnet50_ssn_8xb32.py']

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.00625))
auto_scale_lr = dict(base_batch_size=16)
