# DeepLabV3, ResNet-50-D8 + SN with the torchvision-style 7x7 stem ("r50b",
# as mmseg's r18b/r101b configs), Cityscapes 512x1024, 4 GPUs x 2 images, 80k.
#
# Same as deeplabv3_r50-d8-sn_4xb2-80k_cityscapes-512x1024.py except the
# stem, so that the backbone starts from the ImageNet ResNet-50 v1 + SN
# checkpoint that exists: the authors' one converted with
#   python tools/model_converters/sn_to_mmpretrain.py \
#       resnet50v1_sn_best.pth.tar checkpoints/resnet50_sn_8xb32.pth
# or one trained with configs/resnet50_sn_8xb32.py; the `backbone.` keys of
# either load with no missing keys.
_base_ = './deeplabv3_r50-d8-sn_4xb2-80k_cityscapes-512x1024.py'

model = dict(
    backbone=dict(
        type='ResNet',
        init_cfg=dict(checkpoint='checkpoints/resnet50_sn_8xb32.pth')))
