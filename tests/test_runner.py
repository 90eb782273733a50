"""SN inside mmengine's Runner: training, checkpoints, resume, and the hooks
that fill batch statistics."""
import pickle

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner, load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

import mmsn  # noqa: F401  (registers SN; mmengine's checkpoint types)
from _data import make_image_folder
from mmsn.engine.hooks.batch_average_hook import fill_batch_average
from sn_reference import batch_stats

IMG = 32


def classifier_cfg(depth=50, norm_cfg=dict(type='SN'), num_classes=2):
    return dict(
        type='ImageClassifier',
        data_preprocessor=dict(
            type='ClsDataPreprocessor',
            num_classes=num_classes,
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            to_rgb=True),
        backbone=dict(
            type='ResNet', depth=depth, num_stages=4, out_indices=(3, ),
            norm_cfg=norm_cfg),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=num_classes,
            in_channels=512 * (4 if depth >= 50 else 1),
            loss=dict(type='CrossEntropyLoss')))


def runner_cfg(work_dir, data_root, max_iters, **extra):
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=IMG),
        dict(type='PackInputs'),
    ]
    loader = dict(
        batch_size=2,
        num_workers=0,
        dataset=dict(type='CustomDataset', data_root=data_root,
                     pipeline=pipeline),
        sampler=dict(type='DefaultSampler', shuffle=True))
    cfg = dict(
        default_scope='mmpretrain',
        work_dir=str(work_dir),
        model=classifier_cfg(),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.01, momentum=0.9,
                           weight_decay=1e-4)),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2,
                            by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        log_level='WARNING')
    cfg.update(extra)
    return Config(cfg)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imgs')),
                             num_classes=2, per_class=4, size=IMG)


def test_resnet50_sn_trains_saves_and_resumes(tmp_path, image_folder):
    runner = Runner.from_cfg(runner_cfg(tmp_path, image_folder, 2))
    runner.train()
    ckpt_path = tmp_path / 'iter_2.pth'
    assert ckpt_path.exists()
    sn_layers = [m for m in runner.model.modules()
                 if isinstance(m, mmsn.SwitchableNorm2d)]
    assert len(sn_layers) == 53  # ResNet-50: stem + 16 blocks x 3 + 4
    assert all(int(m.num_batches_tracked) == 2 for m in sn_layers)
    saved = {k: v.clone() for k, v in runner.model.state_dict().items()}
    importance_moved = any(
        not torch.allclose(m.mean_weight, torch.ones(3)) for m in sn_layers)
    assert importance_moved

    # weights_only=True (torch's default) kept: mmengine's message hub is
    # allowed inside mmsn's context (which mmengine's loader runs in), and
    # refused by a plain torch.load.
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(ckpt_path, map_location='cpu', weights_only=True)
    with mmsn.utils.mmengine_checkpoint_globals():
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    assert ckpt['meta']['iter'] == 2
    assert 'backbone.sn1.mean_weight' in ckpt['state_dict']

    resumed = Runner.from_cfg(
        runner_cfg(tmp_path / 'resume', image_folder, 3,
                   resume=True, load_from=str(ckpt_path)))
    resumed.load_or_resume()
    assert resumed.iter == 2
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    momentum = resumed.optim_wrapper.optimizer.state_dict()['state']
    assert len(momentum) > 0
    resumed.train()
    assert resumed.iter == 3


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ('arbitrary code ran',))

    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'x': Payload()}}, path)
    with pytest.raises(pickle.UnpicklingError, match='weights_only'):
        load_checkpoint(torch.nn.Linear(1, 1), str(path))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def _tiny_classifier_and_loader(image_folder, work_dir, **sn_kwargs):
    runner = Runner.from_cfg(
        runner_cfg(work_dir, image_folder, 1,
                   model=classifier_cfg(depth=18, norm_cfg=dict(
                       type='SN', **sn_kwargs))))
    return runner.model, runner.train_dataloader


def _capture_inputs(model, layer):
    captured = []
    handle = layer.register_forward_hook(
        lambda m, args, out: captured.append(args[0].detach().clone()))
    return captured, handle


def test_batch_average_hook_pools_batches_with_frozen_weights(
        tmp_path, image_folder):
    model, loader = _tiny_classifier_and_loader(image_folder, tmp_path,
                                                moving_average=False)
    layer = model.backbone.layer2[0].sn1
    params = {k: v.clone() for k, v in model.named_parameters()}
    captured, handle = _capture_inputs(model, layer)
    used = fill_batch_average(model, loader, num_iters=3)
    handle.remove()
    assert used == 3 and len(captured) == 3
    stats = [batch_stats(x.double(), unbiased=True) for x in captured]
    pooled_mean = torch.stack([m for m, _ in stats]).mean(0)
    pooled_var = torch.stack([v + m**2 for m, v in stats]).mean(0) \
        - pooled_mean**2
    torch.testing.assert_close(layer.running_mean.double(), pooled_mean,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.running_var.double(), pooled_var,
                               atol=1e-5, rtol=1e-4)
    assert int(layer.num_batches_tracked) == 3
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, params[k])
    # eval uses exactly these statistics
    model.eval()
    x = captured[0][:1]
    y = layer(x)
    layer.running_mean.zero_()
    assert not torch.allclose(layer(x), y)


def test_precise_bn_hook_fills_moving_average_sn(tmp_path, image_folder):
    from mmpretrain.engine.hooks.precise_bn_hook import update_bn_stats
    model, loader = _tiny_classifier_and_loader(image_folder, tmp_path)
    layer = model.backbone.layer1[0].sn2
    captured, handle = _capture_inputs(model, layer)
    model.train()
    update_bn_stats(model, loader, num_samples=4, logger='silent')
    handle.remove()
    assert len(captured) == 2
    stats = [batch_stats(x.double(), unbiased=True) for x in captured]
    torch.testing.assert_close(
        layer.running_mean.double(),
        torch.stack([m for m, _ in stats]).mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        layer.running_var.double(),
        torch.stack([v for _, v in stats]).mean(0), atol=1e-5, rtol=1e-4)
    assert layer.momentum == 0.1


def test_getattr_is_allowed_only_for_history_buffer_methods(tmp_path):
    from mmengine.logging.history_buffer import HistoryBuffer

    class SneakyGetattr:
        # any attribute of an allowlisted object other than the statistics
        # methods, e.g. a way towards module globals
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))

    class MethodRef:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, 'mean'))

    path = str(tmp_path / 'getattr.pth')
    torch.save({'meta': {'f': SneakyGetattr()}}, path)
    with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
        CheckpointLoader.load_checkpoint(path)
    torch.save({'meta': {'f': MethodRef()}}, path)
    loaded = CheckpointLoader.load_checkpoint(path)
    assert loaded['meta']['f'] is HistoryBuffer.mean
    # outside mmengine's loader nothing is allowed
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
