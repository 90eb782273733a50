# ResNet101v1+SN (8,32): 8 GPUs x 32 images, lr 0.1, 120 epochs with 5 warmup
# epochs and cosine decay, last_gamma (zero-init of the last norm in each
# block, from the base model). Published: 78.54 top-1 / 94.10 top-5.
_base_ = [
    './_base_/models/resnet101_sn.py',
    './_base_/datasets/imagenet_bs32_lighting.py',
    './_base_/schedules/imagenet_bs256_120e_warmup_coslr.py',
    './_base_/default_runtime.py',
]

train_dataloader = dict(batch_size=32)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
auto_scale_lr = dict(base_batch_size=256)
