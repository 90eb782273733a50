# Faster R-CNN, ResNet-50 + SN backbone, FPN, 1x COCO.
#
# SN in the backbone, the FPN and the box head (4conv1fc, so that it has norm
# layers; the RPN head has none), as in mask-rcnn_r50-sn_fpn_1x_coco.py. The
# backbone starts from the ImageNet ResNet-50 v1 + SN checkpoint (see there).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)

sn_checkpoint = 'checkpoints/resnet50_sn_8xb32.pth'
norm_cfg = dict(type='SN', requires_grad=True)

model = dict(
    backbone=dict(
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained', checkpoint=sn_checkpoint, prefix='backbone.')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg)))
