"""SSN's training recipe end to end: the radius schedule on the digits demo
(every layer ends one-hot and frozen), resuming it, and the clipping of the
importance parameters' gradient (with and without a loss scaler)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch import nn

import mmsn  # noqa: F401
from mmsn import SparseSwitchableNorm2d
from mmsn.engine.hooks.ssn_radius_hook import ssn_layers
from mmsn.ops.sparsestmax import is_one_hot
from mmsn.utils import mmengine_checkpoint_globals

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SSN_DEMO = osp.join(REPO, 'configs', 'demo', 'resnet_ssn_digits.py')
ITERS = 30


@HOOKS.register_module(force=True)
class RecordRadiusHook(Hook):
    """Records (iteration, radius of the first SSN layer) as training sees
    them, and the radius loaded at the start."""
    priority = 'LOW'  # after SSNRadiusHook

    def __init__(self):
        self.seen, self.at_start = [], None

    def before_train(self, runner):
        self.at_start = ssn_layers(runner.model)[0].radius.item()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append(
            (runner.iter, ssn_layers(runner.model)[0].radius.item()))


def _runner(work_dir, iters=ITERS, resume=False):
    cfg = Config.fromfile(SSN_DEMO)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg = dict(by_epoch=False, max_iters=iters, val_interval=iters)
    cfg.param_scheduler = []
    cfg.default_hooks.logger.interval = 10
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=15, by_epoch=False)
    cfg.custom_hooks = [
        dict(type='SSNRadiusHook'),
        dict(type='RecordRadiusHook')
    ]
    cfg.resume = resume
    cfg.randomness = dict(seed=0)
    return Runner.from_cfg(cfg)


def _record(runner):
    return next(h for h in runner.hooks if isinstance(h, RecordRadiusHook))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('ssn_digits')
    runner = _runner(work_dir)
    runner.train()
    return runner, work_dir


def test_every_layer_ends_one_hot_and_frozen(trained):
    runner, work_dir = trained
    layers = ssn_layers(runner.model)
    assert len(layers) == 10
    # the schedule: r = iteration / total, set before every iteration
    seen = _record(runner).seen
    assert [i for i, _ in seen] == list(range(ITERS))
    for i, radius in seen:
        assert radius == pytest.approx(i / ITERS)
    for layer in layers:
        assert layer.mean_fixed.item() == 1 and layer.var_fixed.item() == 1
        mean, var = layer.importance()
        assert is_one_hot(mean).item() and is_one_hot(var).item()
        # the parameters hold exactly the picked one-hot vectors
        torch.testing.assert_close(layer.mean_weight.detach(), mean)
        torch.testing.assert_close(layer.var_weight.detach(), var)
    # and so does the last checkpoint, with the radius
    with mmengine_checkpoint_globals():
        state = torch.load(work_dir / f'iter_{ITERS}.pth', map_location='cpu',
                           weights_only=True)['state_dict']
    for name, module in runner.model.named_modules():
        if isinstance(module, SparseSwitchableNorm2d):
            assert state[f'{name}.mean_fixed'].item() == 1
            assert state[f'{name}.radius'].item() == pytest.approx(
                (ITERS - 1) / ITERS)
            assert sorted(state[f'{name}.mean_weight'].tolist()) == [0, 0, 1]


def test_resume_continues_the_schedule(trained, tmp_path):
    _, work_dir = trained
    import shutil
    shutil.copy(work_dir / 'iter_15.pth', tmp_path / 'iter_15.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_15.pth'))
    runner = _runner(tmp_path, resume=True)
    runner.train()
    record = _record(runner)
    # the buffer came back from the checkpoint (set at iteration 14) ...
    assert record.at_start == pytest.approx(14 / ITERS)
    # ... and the schedule goes on from iteration 15
    assert record.seen[0] == (15, pytest.approx(15 / ITERS))
    assert len(record.seen) == ITERS - 15
    assert all(m.mean_fixed.item() == 1 and m.var_fixed.item() == 1
               for m in ssn_layers(runner.model))


def _clip_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), SparseSwitchableNorm2d(4),
                         nn.Conv2d(4, 2, 1), SparseSwitchableNorm2d(2))


def _recipe_wrapper(model, lr=0.0):
    importance = dict(lr_mult=0.1, decay_mult=0., max_grad_norm=1.0)
    return build_optim_wrapper(
        model,
        dict(
            constructor='GroupClipOptimWrapperConstructor',
            optimizer=dict(type='SGD', lr=lr, momentum=0.9,
                           weight_decay=1e-4),
            paramwise_cfg=dict(custom_keys={
                '.mean_weight': importance,
                '.var_weight': importance
            })))


def _importance(model):
    return [p for n, p in model.named_parameters()
            if n.endswith(('mean_weight', 'var_weight'))]


def test_importance_gradients_are_clipped_jointly_to_norm_one():
    model = _clip_model()
    wrapper = _recipe_wrapper(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    wrapper.step()
    importance = _importance(model)
    total = torch.cat([p.grad for p in importance]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    # one joint norm: every entry scaled by the same factor
    assert len({round(v, 6) for p in importance for v in p.grad.tolist()}) \
        == 1
    others = [p for n, p in model.named_parameters()
              if not n.endswith(('mean_weight', 'var_weight'))]
    assert all((p.grad == 3.0).all() for p in others)
    # a small gradient is left alone
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    wrapper.step()
    assert all((p.grad == 1e-3).all() for p in importance)


def test_clipping_sees_unscaled_gradients_under_a_grad_scaler():
    """AmpOptimWrapper steps through GradScaler.step, which unscales before
    optimizer.step(): the pre-hook clips true gradients."""
    model = _clip_model()
    reference = _clip_model()
    x = torch.randn(2, 3, 6, 6)
    wrapper = _recipe_wrapper(model)
    ref_wrapper = _recipe_wrapper(reference)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(model(x).square().sum()).backward()
    scaler.step(wrapper.optimizer)
    reference(x).square().sum().backward()
    ref_wrapper.step()
    for p, q in zip(_importance(model), _importance(reference)):
        torch.testing.assert_close(p.grad, q.grad)


def test_constructor_needs_clip_settings():
    with pytest.raises(ValueError, match='no parameter group has a max_grad'):
        build_optim_wrapper(
            _clip_model(),
            dict(constructor='GroupClipOptimWrapperConstructor',
                 optimizer=dict(type='SGD', lr=0.1)))
    with pytest.raises(ValueError, match='positive number'):
        build_optim_wrapper(
            _clip_model(),
            dict(constructor='GroupClipOptimWrapperConstructor',
                 optimizer=dict(type='SGD', lr=0.1),
                 paramwise_cfg=dict(custom_keys={
                     '.mean_weight': dict(max_grad_norm=-1.0)
                 })))
