# Mask R-CNN, ResNet-50 + SN, FPN, 1x COCO, with the backbone's SN running
# (BN-branch) statistics frozen at their ImageNet values (norm_eval=True), as
# detectors usually do with BN. SN's IN and LN statistics are computed from
# each input in any mode, and the importance weights, gamma and beta keep
# training; the SN layers of the FPN and heads start from scratch and keep
# live statistics.
_base_ = './mask-rcnn_r50-sn_fpn_1x_coco.py'

model = dict(backbone=dict(norm_eval=True))
