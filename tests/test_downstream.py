"""SN as a detection and segmentation backbone, run for real on the CPU.

Every config under ``configs/mmdet`` and ``configs/mmseg`` is loaded through
mmdet's/mmseg's own ``_base_`` configs, its model is built, trained for one
iteration (through the config's data preprocessor and optimizer) and run for
one prediction on small synthetic images. These tests need full mmcv (with
compiled ops), mmdet and mmsegmentation, which ``tools/run_tests.sh``
installs (``tools/run_demo.sh`` sets up the classification stack only).
Where they are absent the module is skipped with the reason, unless
``MMSN_REQUIRE_DOWNSTREAM=1`` (set by ``.ci/run``) makes that a failure; an
installed but broken mmcv/mmdet/mmseg is always an error.
"""
import glob
import logging
import os
import os.path as osp
import re
from importlib.util import find_spec

import numpy as np
import pytest
import torch

import mmsn  # noqa: F401  (registers SN)
from mmsn import SwitchableNorm2d
from mmsn.models.norms.switchable_norm import _SwitchableNorm


def _missing_downstream():
    missing = [
        name for name, module in (('mmdet', 'mmdet'),
                                  ('mmsegmentation', 'mmseg'))
        if find_spec(module) is None
    ]
    if find_spec('mmcv') is None or find_spec('mmcv._ext') is None:
        missing.append('full mmcv with compiled ops (mmcv-lite has none)')
    return missing


if _missing_downstream():
    _reason = (f'needs {", ".join(_missing_downstream())}: '
               f'bash tools/run_tests.sh installs them')
    if os.environ.get('MMSN_REQUIRE_DOWNSTREAM') == '1':
        pytest.fail(f'MMSN_REQUIRE_DOWNSTREAM=1 and this module {_reason}',
                    pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

# Present: from here on a broken install is an error, not a skip.
import mmcv.ops  # noqa: F401,E402
import mmdet  # noqa: F401,E402
import mmseg  # noqa: F401,E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner.checkpoint import save_checkpoint  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'mmdet', '*.py')))
SEG_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'mmseg', '*.py')))


# What the README's converter command writes (the authors' resnetv1sn50).
CONVERTED_R50 = 'checkpoints/resnet50_sn_8xb32.pth'


def test_configs_name_only_weights_a_user_can_obtain():
    """Every checkpoint a downstream config loads is the one the README's
    converter command writes (no config names weights nobody publishes)."""
    readme = open(osp.join(ROOT, 'README.md')).read()
    command = r'sn_to_mmpretrain(\.py)? \S+ ' + re.escape(CONVERTED_R50)
    assert re.search(command, readme)
    for path in DET_CONFIGS + SEG_CONFIGS:
        backbone = Config.fromfile(path).model.backbone
        assert backbone.init_cfg.checkpoint == CONVERTED_R50, path


def _name(path):
    return osp.splitext(osp.basename(path))[0]


def load_config(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports == dict(
        imports=['mmsn'], allow_failed_imports=False)
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.default_scope)
    return cfg


def build_model(cfg):
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    assert type(model).__module__.split('.')[0] == cfg.default_scope
    return model


def sn_layers(module):
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, _SwitchableNorm)]


def check_importance_grads(model, parts):
    """Every trainable SN layer of each part got a finite gradient on its
    importance weights, and the gradients are not all zero."""
    for part in parts:
        layers = sn_layers(getattr(model, part))
        assert layers, f'no SN layer in {part}'
        trainable = [(n, m) for n, m in layers if m.mean_weight.requires_grad]
        assert trainable, f'no trainable SN layer in {part}'
        total = 0.
        for name, layer in trainable:
            for p in (layer.mean_weight, layer.var_weight):
                assert p.grad is not None, f'{part}.{name}: no gradient'
                assert torch.isfinite(p.grad).all(), f'{part}.{name}'
                total += p.grad.abs().sum().item()
        assert total > 0, f'{part}: all importance gradients are zero'


def train_one_iteration(model, cfg, data):
    """What the runner's train loop does in one iteration, with the gradient
    check between backward and the optimizer step."""
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    batch = model.data_preprocessor(data, True)
    losses = model(**batch, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    optim_wrapper.backward(loss)
    yield loss, log_vars
    optim_wrapper.step()
    optim_wrapper.zero_grad()


# ----------------------------------------------------------------------------
# detection
def det_batch(num_images=2, size=(96, 128), num_classes=80, seed=0):
    """Noisy images with a few bright rectangles, annotated as boxes, masks
    and labels (what PackDetInputs produces)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    rng = np.random.default_rng(seed)
    h, w = size
    inputs, samples = [], []
    for i in range(num_images):
        img = rng.normal(100, 20, (3, h, w))
        boxes, masks = [], []
        for _ in range(2):
            bw, bh = rng.integers(24, 56), rng.integers(24, 56)
            x1, y1 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            img[:, y1:y1 + bh, x1:x1 + bw] += rng.uniform(60, 120, (3, 1, 1))
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            mask = np.zeros((h, w), np.uint8)
            mask[y1:y1 + bh, x1:x1 + bw] = 1
            masks.append(mask)
        inputs.append(torch.from_numpy(img.clip(0, 255).astype(np.uint8)))
        sample = DetDataSample(
            metainfo=dict(
                img_id=i,
                img_path=f'synthetic_{i}.png',
                ori_shape=(h, w),
                img_shape=(h, w),
                scale_factor=(1., 1.),
                flip=False,
                flip_direction=None))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.from_numpy(rng.integers(0, num_classes, 2)),
            masks=BitmapMasks(np.stack(masks), h, w))
        sample.ignored_instances = InstanceData(
            bboxes=torch.zeros((0, 4)), labels=torch.zeros(0).long())
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('path', DET_CONFIGS, ids=_name)
def test_detector_trains_and_predicts(path):
    cfg = load_config(path)
    model_cfg = cfg.model
    # SN where the paper uses it: backbone, FPN and RoI heads (not the RPN).
    assert model_cfg.backbone.norm_cfg.type == 'SN'
    assert model_cfg.neck.norm_cfg.type == 'SN'
    assert model_cfg.roi_head.bbox_head.norm_cfg.type == 'SN'
    assert model_cfg.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
    init = model_cfg.backbone.init_cfg
    assert init.type == 'Pretrained' and init.prefix == 'backbone.'
    assert init.checkpoint == CONVERTED_R50
    is_mask = 'mask_head' in model_cfg.roi_head
    if is_mask:
        assert model_cfg.roi_head.mask_head.norm_cfg.type == 'SN'
    assert cfg.train_cfg.max_epochs == (24 if '_2x_' in path else 12)
    if '_2x_' in path:
        assert cfg.param_scheduler[1].milestones == [16, 22]
    normeval = 'normeval' in path
    assert model_cfg.backbone.norm_eval is normeval

    model = build_model(cfg)
    assert type(model).__name__ == ('MaskRCNN' if is_mask else 'FasterRCNN')
    parts = ['backbone', 'neck', 'roi_head']
    for part in parts:
        assert all(type(m) is SwitchableNorm2d
                   for _, m in sn_layers(getattr(model, part)))
    assert not sn_layers(model.rpn_head)

    backbone_sn = sn_layers(model.backbone)
    neck_sn = sn_layers(model.neck)
    before = {n: m.running_mean.clone() for n, m in backbone_sn + neck_sn}
    data = det_batch(num_classes=model.roi_head.bbox_head.num_classes)
    steps = train_one_iteration(model, cfg, data)
    loss, log_vars = next(steps)
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox'} <= set(log_vars)
    if is_mask:
        assert 'loss_mask' in log_vars
    check_importance_grads(model, parts)
    # norm_eval freezes the backbone's running statistics (only); the stem
    # and layer1 are frozen anyway (mmdet's frozen_stages=1)
    assert model_cfg.backbone.frozen_stages == 1
    for name, layer in backbone_sn:
        live = not normeval and not name.startswith(('sn1', 'layer1.'))
        assert layer.training is live, name
        assert torch.equal(before[name], layer.running_mean) is not live
    for name, layer in neck_sn:
        assert layer.training
        assert not torch.equal(before[name], layer.running_mean)
    next(steps, None)

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for result in results:
        pred = result.pred_instances
        assert pred.bboxes.shape[1] == 4
        assert len(pred.bboxes) == len(pred.scores) == len(pred.labels)
        assert torch.isfinite(pred.bboxes).all()
        assert torch.isfinite(pred.scores).all()
        if is_mask:
            assert pred.masks.shape[1:] == (96, 128)


# ----------------------------------------------------------------------------
# segmentation
def seg_batch(num_images=2, size=(64, 64), num_classes=19, seed=0):
    """Images made of coloured blocks, with the block classes as labels and
    an ignored (255) border."""
    from mmseg.structures import SegDataSample
    rng = np.random.default_rng(seed)
    h, w = size
    inputs, samples = [], []
    for i in range(num_images):
        labels = rng.integers(0, num_classes, (4, 4))
        seg = np.kron(labels, np.ones((h // 4, w // 4), np.int64))
        colours = rng.uniform(0, 255, (num_classes, 3))
        img = colours[seg].transpose(2, 0, 1) + rng.normal(0, 10, (3, h, w))
        seg[:2], seg[:, :2] = 255, 255
        inputs.append(torch.from_numpy(img.clip(0, 255).astype(np.uint8)))
        sample = SegDataSample(
            metainfo=dict(
                img_path=f'synthetic_{i}.png',
                ori_shape=(h, w),
                img_shape=(h, w),
                pad_shape=(h, w),
                scale_factor=(1., 1.),
                flip=False,
                flip_direction=None,
                reduce_zero_label=False))
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(seg)[None])
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def small_seg_model(cfg, size=(64, 64)):
    # The data preprocessor pads training batches to the crop size
    # (512x1024 in the Cityscapes configs); pad to the synthetic images.
    cfg.model.data_preprocessor.size = size
    return build_model(cfg)


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=_name)
def test_segmentor_trains_and_predicts(path):
    cfg = load_config(path)
    model_cfg = cfg.model
    assert model_cfg.pretrained is None
    # the 7x7 stem of the ImageNet SN checkpoints that exist
    assert model_cfg.backbone.type == 'ResNet'
    assert model_cfg.backbone.dilations == (1, 1, 2, 4)
    assert model_cfg.backbone.strides == (1, 2, 1, 1)
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        assert model_cfg[part].norm_cfg.type == 'SN'
    init = model_cfg.backbone.init_cfg
    assert init.type == 'Pretrained' and init.prefix == 'backbone.'
    assert init.checkpoint == CONVERTED_R50
    num_classes = 150 if 'ade20k' in path else 19
    assert model_cfg.decode_head.num_classes == num_classes

    model = small_seg_model(cfg)
    assert type(model).__name__ == 'EncoderDecoder'
    assert not model.backbone.deep_stem
    data = seg_batch(num_classes=num_classes)
    steps = train_one_iteration(model, cfg, data)
    loss, log_vars = next(steps)
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(log_vars)
    check_importance_grads(model,
                           ['backbone', 'decode_head', 'auxiliary_head'])
    next(steps, None)

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for result in results:
        assert result.seg_logits.data.shape == (num_classes, 64, 64)
        assert torch.isfinite(result.seg_logits.data).all()
        pred = result.pred_sem_seg.data
        assert pred.shape == (1, 64, 64)
        assert 0 <= pred.min() and pred.max() < num_classes


def authors_style_sn_forward(layer, x):
    """SN with the authors' numerics: the IN variance is the unbiased
    estimate over the spatial positions, and LN/BN statistics are derived
    from the IN statistics. One position gives 0/0 = NaN."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    mean_in = flat.mean(-1, keepdim=True)
    var_in = flat.var(-1, keepdim=True)  # unbiased, divides by HW - 1
    second_in = var_in + mean_in**2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second_in.mean(1, keepdim=True) - mean_ln**2
    if layer.training:
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = second_in.mean(0, keepdim=True) - mean_bn**2
    else:
        mean_bn = layer.running_mean.view(1, c, 1)
        var_bn = layer.running_var.view(1, c, 1)
    w = torch.softmax(layer.mean_weight, 0)
    v = torch.softmax(layer.var_weight, 0)
    mean = w[0] * mean_in + w[1] * mean_ln + w[2] * mean_bn
    var = v[0] * var_in + v[1] * var_ln + v[2] * var_bn
    out = (flat - mean) / (var + layer.eps).sqrt()
    out = out.view_as(x)
    shape = (1, c) + (1, ) * (x.dim() - 2)
    return out * layer.weight.view(shape) + layer.bias.view(shape)


def test_authors_style_forward_matches_sn():
    """The authors'-style layer above is SN itself wherever it is defined."""
    torch.manual_seed(0)
    layer = SwitchableNorm2d(8)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.mean_weight,
                  layer.var_weight):
            p.normal_()
    x = torch.randn(4, 8, 5, 3)
    expected = authors_style_sn_forward(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings('ignore:var.*degrees of freedom')
def test_pspnet_pyramid_pooling_1x1_is_finite():
    """PSPNet's pyramid pooling (scale 1) feeds N x C x 1 x 1 maps to SN: the
    loss is finite with mmsn's SN and NaN with the authors' numerics."""
    path = osp.join(ROOT, 'configs', 'mmseg',
                    'pspnet_r50b-d8-sn_4xb2-80k_cityscapes-512x1024.py')
    cfg = load_config(path)
    assert 1 in cfg.model.decode_head.pool_scales
    model = small_seg_model(cfg)
    model.train()
    data = model.data_preprocessor(seg_batch(), True)

    spatial = {}

    def record(name):

        def hook(module, args):
            spatial[name] = tuple(args[0].shape[2:])

        return hook

    hooks = [
        m.register_forward_pre_hook(record(n))
        for n, m in sn_layers(model.decode_head)
    ]
    losses = model(**data, mode='loss')
    for hook in hooks:
        hook.remove()
    loss, _ = model.parse_losses(losses)
    one_by_one = [n for n, s in spatial.items() if s == (1, 1)]
    assert one_by_one, spatial  # the scale-1 branch of the PPM
    assert all(n.startswith('psp_modules.0.') for n in one_by_one)
    assert torch.isfinite(loss)
    loss.backward()
    ppm_sn = dict(sn_layers(model.decode_head))[one_by_one[0]]
    assert torch.isfinite(ppm_sn.mean_weight.grad).all()
    assert torch.isfinite(ppm_sn.var_weight.grad).all()

    # The same model and batch with the authors' numerics in every SN layer.
    for _, layer in sn_layers(model):
        layer.forward = (lambda x, layer=layer:
                         authors_style_sn_forward(layer, x))
    model.zero_grad()
    losses = model(**data, mode='loss')
    assert torch.isnan(losses['decode.loss_ce'])
    assert torch.isfinite(losses['aux.loss_ce'])  # no 1x1 map there


# ----------------------------------------------------------------------------
# ImageNet SN checkpoint -> downstream backbone
def save_sn_classifier(path, backbone):
    """An mmpretrain ImageClassifier with a ResNet-50 + SN backbone, its SN
    state made distinctive, saved as an mmengine checkpoint."""
    torch.manual_seed(1)
    init_default_scope('mmpretrain')
    classifier = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type=backbone,
                depth=50,
                norm_cfg=dict(type='SN'),
                zero_init_residual=True),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=1000,
                in_channels=2048,
                loss=dict(type='CrossEntropyLoss'))))
    classifier.init_weights()
    with torch.no_grad():
        for _, layer in sn_layers(classifier):
            layer.mean_weight.normal_()
            layer.var_weight.normal_()
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
    save_checkpoint(
        dict(meta=dict(note='synthetic SN classifier'),
             state_dict=classifier.state_dict()), path)
    return classifier


class _Records(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def init_and_log(model):
    logger = MMLogger.get_current_instance()
    handler = _Records()
    logger.addHandler(handler)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    return '\n'.join(handler.messages)


@pytest.mark.parametrize('config,backbone', [
    ('mmdet/mask-rcnn_r50-sn_fpn_1x_coco.py', 'ResNet'),
    ('mmdet/faster-rcnn_r50-sn_fpn_1x_coco.py', 'ResNet'),
    ('mmseg/pspnet_r50b-d8-sn_4xb2-80k_cityscapes-512x1024.py', 'ResNet'),
])
def test_sn_classifier_checkpoint_initialises_backbone(tmp_path, config,
                                                       backbone):
    ckpt = str(tmp_path / 'resnet50_sn_in1k.pth')
    classifier = save_sn_classifier(ckpt, backbone)
    cfg = load_config(osp.join(ROOT, 'configs', config))
    cfg.model.backbone.init_cfg.checkpoint = ckpt
    model = build_model(cfg)
    log = init_and_log(model)
    assert 'missing keys' not in log, log
    assert 'unexpected key' not in log, log

    source = classifier.backbone.state_dict()
    target = model.backbone.state_dict()
    sn_keys = [k for k in target if k.endswith(('mean_weight', 'var_weight'))]
    assert len(sn_keys) == 2 * 53  # 1 stem + 16 blocks x 3 + 4 downsample
    assert set(target) == set(source)
    for key, value in target.items():
        assert torch.equal(value, source[key]), key
