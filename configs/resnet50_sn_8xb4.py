# ResNet50v1+SN (8,4): 8 GPUs x 4 images, lr 0.0125 (0.1 x 32 / 256),
# 100 epochs, lr x0.1 at epochs 30, 60 and 90, last_gamma.
# Published: 75.85 top-1 / 92.70 top-5.
_base_ = ['./resnet50_sn_8xb32_step.py']

train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))
auto_scale_lr = dict(base_batch_size=32)
