"""RNGStateHook: generator states round-trip, load safely, and make an
iteration-based run that stops and resumes end where an uninterrupted one
does. (The epoch-based demo, killed with SIGKILL: tests/test_resume.py.)"""
import logging
import random
import shutil

import numpy as np
import torch
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmsn  # noqa: F401  (registers the hook)
from mmsn import SwitchableNorm2d
from mmsn.engine.hooks.rng_state_hook import (capture_rng_states,
                                              restore_rng_states)

ITERS = 8
STOP_AT = 3


def _draws():
    return (random.random(), float(np.random.rand()), np.random.randn(),
            float(torch.rand(())))


def test_states_round_trip_and_load_with_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # numpy caches the second Gaussian: part of the state
    torch.manual_seed(3)
    state = capture_rng_states()
    expected = _draws()
    path = tmp_path / 'states.pth'
    torch.save(state, path)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_states(torch.load(path, weights_only=True))
    assert _draws() == expected


class Net(BaseModel):
    """SN and dropout (torch's generator)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.sn = SwitchableNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 2)

    def forward(self, inputs, labels, mode='tensor'):
        h = self.drop(self.sn(self.conv(inputs)).relu().mean((2, 3)))
        logits = self.fc(h)
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        if mode == 'predict':
            return [logits]
        return logits


class NoisyData(Dataset):
    """Augmentation from Python's and numpy's global generators."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        x = torch.full((1, 6, 6), float(i % 2))
        x += torch.from_numpy(np.random.randn(1, 6, 6).astype(np.float32))
        shift = random.randint(-1, 1)
        return dict(inputs=torch.roll(x, shift, 2), labels=i % 2)


class StopAfter(Hook):

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == STOP_AT:
            runner.train_loop.stop_training = True


class DrawingMetric(BaseMetric):
    """A metric that draws from torch's generator, as a validation may."""

    def process(self, data_batch, data_samples):
        self.results.append(float(torch.rand(())))

    def compute_metrics(self, results):
        return dict(draw=sum(results))


def _runner(work_dir, resume=False, hooks=True):
    torch.manual_seed(0)  # the model is built before the Runner seeds
    return Runner(
        model=Net(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=NoisyData(), batch_size=4, num_workers=0,
            collate_fn=dict(type='default_collate'),
            sampler=dict(type='InfiniteSampler', shuffle=True)),
        val_dataloader=DataLoader(NoisyData(), batch_size=6),
        val_evaluator=Evaluator(DrawingMetric()),
        val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=ITERS, val_interval=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1,
                                          momentum=0.9)),
        default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=STOP_AT, by_epoch=False)),
        custom_hooks=[dict(type='RNGStateHook')] if hooks else [],
        randomness=dict(seed=5),
        resume=resume,
        default_scope='mmengine')


def _weights(runner):
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


def test_iteration_based_stop_and_resume_is_exact(tmp_path):
    whole = _runner(tmp_path / 'whole')
    whole.train()
    expected = _weights(whole)

    stopped = _runner(tmp_path / 'cut')
    stopped.register_hook(StopAfter(), priority='LOWEST')
    stopped.train()
    assert stopped.iter == STOP_AT
    shutil.copytree(tmp_path / 'cut', tmp_path / 'control')
    resumed = _runner(tmp_path / 'cut', resume=True)
    resumed.train()
    assert resumed.iter == ITERS
    got = _weights(resumed)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] \
        == []

    # the same resume without the hook draws other noise and dropout masks
    control = _runner(tmp_path / 'control', resume=True, hooks=False)
    control.train()
    got = _weights(control)
    assert any(not torch.equal(expected[k], got[k]) for k in expected)


def test_resuming_a_checkpoint_without_states_warns(tmp_path):
    plain = _runner(tmp_path, hooks=False)
    plain.register_hook(StopAfter(), priority='LOWEST')
    plain.train()
    resumed = _runner(tmp_path, resume=True)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    resumed.logger.addHandler(handler)
    try:
        resumed.train()
    finally:
        resumed.logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records
                if r.levelno == logging.WARNING and 'RNGStateHook' in
                r.getMessage()]
    assert warnings == [
        'RNGStateHook: the checkpoint resumed from holds no random '
        'generator states (it was saved without this hook); the resumed '
        'run will not repeat an uninterrupted one exactly.'
    ]
