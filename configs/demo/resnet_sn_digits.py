# Demo: a small CIFAR-style ResNet with Switchable Normalization trained on
# scikit-learn's bundled handwritten digits (8x8 grey images, 1438 train /
# 359 val, fixed split). Runs on a CPU in a few minutes, downloads nothing:
#   bash tools/run_demo.sh
default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

# ---- model -----------------------------------------------------------------
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ResNet_CIFAR',  # 3x3 stem conv with stride 1, no max-pool
        # Two stages of ResNet-18's basic blocks (2 + 2 blocks, 32 and 64
        # channels): 8x8 maps, then 4x4. Enough for 8x8 digits, and cheap.
        depth=18,
        in_channels=1,
        stem_channels=32,
        base_channels=32,
        num_stages=2,
        strides=(1, 2),
        dilations=(1, 1),
        out_indices=(1, ),
        # The demo's layers learn a large BN share; there the SN authors
        # advise batch average over moving averages: the BN statistics for
        # eval are pooled over the training set with the final weights
        # (SNBatchAverageHook below).
        norm_cfg=dict(type='SN', requires_grad=True, moving_average=False)),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=64,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

# ---- data ------------------------------------------------------------------
# Mean/std of the 0..255-scaled digit images.
data_preprocessor = dict(
    num_classes=10, mean=[77.8], std=[95.9], to_rgb=False)

train_pipeline = [
    # Shifts by up to one pixel; digits are not flipped.
    dict(type='RandomCrop', crop_size=8, padding=1),
    dict(type='PackInputs'),
]
# Image files load as 3-channel BGR (e.g. with ImageClassificationInferencer):
# make them grey like the dataset's images, and 8x8. scikit-learn made each
# digit by counting the set pixels of 4x4 blocks of a 32x32 bitmap, which is
# what 'area' resizing does (the dataset's own 8x8 images pass unchanged);
# a larger image fed as it is would be misread.
test_pipeline = [
    dict(type='ToGrayscale'),
    dict(type='Resize', scale=(8, 8), interpolation='area'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(type='SklearnDigits', split='train',
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=0,
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(type='SklearnDigits', split='val', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# ---- schedule --------------------------------------------------------------
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=7, by_epoch=True, begin=1, end=8,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=8, val_interval=4)
val_cfg = dict()
test_cfg = dict()

# ---- runtime ---------------------------------------------------------------
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=15),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=8, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False),
)
custom_hooks = [
    dict(type='SNImportanceLoggerHook', interval=45),
    # before each validation (every 4 epochs) and the final checkpoint
    dict(type='SNBatchAverageHook', num_samples=1438, interval=4),
    # resuming (--resume) repeats the uninterrupted run exactly
    dict(type='RNGStateHook'),
]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
