# ResNet101v2+SN (8,32), pre-activation: 8 GPUs x 32 images, lr 0.1,
# 120 epochs with 5 warmup epochs and cosine decay.
# Published: 78.81 top-1 / 94.16 top-5.
_base_ = [
    './_base_/models/resnet101v2_sn.py',
    './_base_/datasets/imagenet_bs32_lighting.py',
    './_base_/schedules/imagenet_bs256_120e_warmup_coslr.py',
    './_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=32)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
auto_scale_lr = dict(base_batch_size=256)
