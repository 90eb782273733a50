# ImageNet, 32 images per GPU, with the SN authors' augmentation:
# RandomResizedCrop 224 + horizontal flip + AlexNet-style PCA lighting noise
# for training; resize the shorter side to 256 + centre crop 224 for testing
# (the test pipeline and the mean/std normalisation come from the base).
_base_ = ['mmpretrain::_base_/datasets/imagenet_bs32.py']

# ImageNet PCA of the RGB pixels (0-255 scale), listed in BGR order because
# mmcv loads images as BGR; alphastd 0.1 as in fb.resnet.torch.
EIGVAL = [55.4625, 4.7940, 1.1475]
EIGVEC = [
    [-0.5836, -0.6948, 0.4203],
    [-0.5808, -0.0045, -0.8140],
    [-0.5675, 0.7192, 0.4009],
]

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='Lighting',
        eigval=EIGVAL,
        eigvec=EIGVEC,
        alphastd=0.1,
        to_rgb=False),
    dict(type='PackInputs'),
]

train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
