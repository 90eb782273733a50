# Mask R-CNN, ResNet-50 + SN backbone, FPN, 1x COCO.
#
# Switchable Normalization replaces BN in the backbone, the FPN and the RoI
# heads (the paper's Mask R-CNN setting, as GN's "gn-all": the box head
# becomes 4conv1fc so it has norm layers; the RPN head has none). SN keeps
# its own statistics at 2 images per GPU, so the backbone is fine-tuned with
# live statistics (norm_eval=False); see
# mask-rcnn_r50-sn-normeval_fpn_1x_coco.py for frozen backbone statistics.
#
# The backbone starts from the ImageNet ResNet-50 v1 + SN checkpoint, e.g.
# the authors' one converted with
#   python tools/model_converters/sn_to_mmpretrain.py \
#       resnet50v1_sn_best.pth.tar checkpoints/resnet50_sn_8xb32.pth
# or one trained with configs/resnet50_sn_8xb32.py (`backbone.` keys of an
# mmpretrain ImageClassifier).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

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
            norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
