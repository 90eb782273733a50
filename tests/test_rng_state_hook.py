"""RNGStateHook: generator states round-trip, load safely, and make an
iteration-based run that stops and resumes end where an uninterrupted one
does, also with another seed, with dataloader workers and with two
processes; a resume that cannot be exact warns and names why. (The
epoch-based demo, killed with SIGKILL: tests/test_resume.py.)"""
import logging
import os
import random
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmsn  # noqa: F401  (registers the hook)
from _dist import run_processes
from mmsn import SwitchableNorm2d
from mmsn.engine.hooks.rng_state_hook import (capture_rng_states,
                                              restore_rng_states)

BATCH = 3
ITERS = 8
# a validation (every VAL_INTERVAL iterations) runs right after the
# checkpoint the stopped run ends with: the uninterrupted run draws it
# between that checkpoint and the iterations the resumed run repeats
STOP_AT = VAL_INTERVAL = 3
SEED = 5


def _draws():
    return (random.random(), random.gauss(0, 1), float(np.random.rand()),
            np.random.randn(), float(torch.rand(())))


def test_states_round_trip_and_load_with_weights_only(tmp_path):
    random.seed(1)
    random.gauss(0, 1)  # Python caches the second Gaussian: part of the state
    np.random.seed(2)
    np.random.randn()  # numpy caches the second Gaussian too
    torch.manual_seed(3)
    state = capture_rng_states()
    assert state['python']['gauss_next'] is not None
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
    """Augmentation from Python's and numpy's global generators (one
    Python Gaussian a sample: an odd batch leaves one cached)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        x = torch.full((1, 6, 6), float(i % 2) + random.gauss(0, 0.5))
        x += torch.from_numpy(np.random.randn(1, 6, 6).astype(np.float32))
        shift = random.randint(-1, 1)
        return dict(inputs=torch.roll(x, shift, 2), labels=i % 2)


class StopAfter(Hook):

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == STOP_AT:
            runner.train_loop.stop_training = True


class DrawingMetric(BaseMetric):
    """A metric that draws from every generator, as a validation may."""

    def process(self, data_batch, data_samples):
        self.results.append(random.random() + random.gauss(0, 1) +
                            float(np.random.rand()) + float(torch.rand(())))

    def compute_metrics(self, results):
        return dict(draw=sum(results))


def _runner(work_dir, resume=False, hooks=True, seed=SEED, num_workers=0,
            persistent_workers=False, world_size=1, sampler_seed=None,
            **kwargs):
    torch.manual_seed(0)  # the model is built before the Runner seeds
    if world_size > 1:
        kwargs.update(
            launcher='pytorch',
            cfg=dict(model_wrapper_cfg=dict(
                type='MMDistributedDataParallel', device_ids=None,
                broadcast_buffers=False)),
            env_cfg=dict(dist_cfg=dict(backend='gloo')))
    return Runner(
        model=Net(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=NoisyData(), batch_size=BATCH, num_workers=num_workers,
            persistent_workers=persistent_workers,
            collate_fn=dict(type='default_collate'),
            sampler=dict(type='InfiniteSampler', shuffle=True,
                         **({} if sampler_seed is None else dict(
                             seed=sampler_seed)))),
        val_dataloader=DataLoader(NoisyData(), batch_size=6),
        val_evaluator=Evaluator(DrawingMetric()),
        val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=ITERS,
                       val_interval=VAL_INTERVAL),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1,
                                          momentum=0.9)),
        default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=STOP_AT, by_epoch=False)),
        custom_hooks=[dict(type='RNGStateHook')] if hooks else [],
        randomness=dict(seed=seed, diff_rank_seed=world_size > 1),
        resume=resume,
        default_scope='mmengine',
        **kwargs)


def _weights(runner):
    model = runner.model.module if hasattr(runner.model, 'module') \
        else runner.model
    return {k: v.clone() for k, v in model.state_dict().items()}


def _differences(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def _stop_early(runner):
    runner.register_hook(StopAfter(), priority='LOWEST')
    runner.train()
    assert runner.iter == STOP_AT


@contextmanager
def _log_records():
    """What mmengine's current logger (the Runner's) emits meanwhile."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _hook_warnings(records):
    return [r.getMessage() for r in records
            if r.levelno == logging.WARNING and 'RNGStateHook' in
            r.getMessage()]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    whole = _runner(tmp_path_factory.mktemp('whole'))
    whole.train()
    return _weights(whole)


def test_iteration_based_stop_and_resume_is_exact(tmp_path, uninterrupted):
    _stop_early(_runner(tmp_path / 'cut'))
    saved = torch.load(tmp_path / 'cut' / f'iter_{STOP_AT}.pth',
                       weights_only=False)['rng_states']
    # the paths this test is for are taken: a cached Python Gaussian at the
    # checkpoint, a drawing validation right after it
    assert saved['ranks'][0]['generators']['python']['gauss_next'] \
        is not None
    assert STOP_AT % VAL_INTERVAL == 0
    shutil.copytree(tmp_path / 'cut', tmp_path / 'control')
    resumed = _runner(tmp_path / 'cut', resume=True)
    with _log_records() as records:
        resumed.train()
    assert resumed.iter == ITERS
    assert _differences(uninterrupted, _weights(resumed)) == []
    assert _hook_warnings(records) == []
    assert f'RNGStateHook: random generators restored as saved at epoch 0, ' \
        f'iteration {STOP_AT}' in [r.getMessage() for r in records]

    # the same resume without the hook draws other noise and dropout masks
    control = _runner(tmp_path / 'control', resume=True, hooks=False)
    control.train()
    assert _differences(uninterrupted, _weights(control))


@pytest.mark.parametrize('resumed_seed, sampler_seed', [
    (11, None), (None, None), (11, 3)
], ids=['other_seed', 'random_seed', 'other_worker_seed_only'])
def test_resume_with_another_seed_and_workers_is_exact(
        tmp_path, resumed_seed, sampler_seed):
    """The sampler's order and the workers' augmentations follow the saved
    seeds, not those the resumed run was started with (a sampler seed set
    in the config stays: then only the workers' seed changes)."""
    kwargs = dict(num_workers=2, sampler_seed=sampler_seed)
    whole = _runner(tmp_path / 'whole', **kwargs)
    whole.train()
    _stop_early(_runner(tmp_path / 'cut', **kwargs))
    resumed = _runner(tmp_path / 'cut', resume=True, seed=resumed_seed,
                      **kwargs)
    with _log_records() as records:
        resumed.train()
    assert _differences(_weights(whole), _weights(resumed)) == []
    assert _hook_warnings(records) == []


@pytest.mark.parametrize('saved, resumed, reasons', [
    (dict(num_workers=0), dict(num_workers=2),
     ['train_dataloader.num_workers is 2 here, 0 when the checkpoint was '
      'saved']),
    (dict(num_workers=2), dict(num_workers=0),
     ['train_dataloader.num_workers is 0 here, 2 when the checkpoint was '
      'saved']),
    (dict(num_workers=1), dict(num_workers=2, persistent_workers=True),
     ['train_dataloader.num_workers is 2 here, 1 when the checkpoint was '
      'saved', 'train_dataloader.persistent_workers is True here, False '
      'when the checkpoint was saved']),
], ids=['0to2', '2to0', '1to2_persistent'])
def test_resume_with_other_workers_warns_naming_the_change(
        tmp_path, uninterrupted, saved, resumed, reasons):
    _stop_early(_runner(tmp_path, **saved))
    runner = _runner(tmp_path, resume=True, **resumed)
    with _log_records() as records:
        runner.train()
    expected = [
        'RNGStateHook: the resumed run will not repeat the uninterrupted '
        'one exactly: ' + '; '.join(reasons) + '.'
    ]
    if resumed.get('persistent_workers'):
        expected.insert(0, (
            'RNGStateHook: the train loader has persistent workers, whose '
            'random generators live in the worker processes and are not '
            'saved; a resumed run will not repeat the uninterrupted one '
            'exactly (persistent_workers=False would).'))
    assert _hook_warnings(records) == expected
    if saved['num_workers'] == 0:  # the run it differs from
        assert _differences(uninterrupted, _weights(runner))


def test_resuming_a_checkpoint_without_states_warns(tmp_path):
    _stop_early(_runner(tmp_path, hooks=False))
    resumed = _runner(tmp_path, resume=True)
    with _log_records() as records:
        resumed.train()
    assert _hook_warnings(records) == [
        'RNGStateHook: the checkpoint resumed from holds no random '
        'generator states (it was saved without this hook, or by an earlier '
        'mmsn); the resumed run will not repeat an uninterrupted one '
        'exactly.'
    ]


def test_resuming_a_checkpoint_written_outside_training_warns(tmp_path):
    """With several processes, a checkpoint written where the hook did not
    gather the processes' states holds none (``ranks`` None)."""
    _stop_early(_runner(tmp_path, num_workers=1))
    path = tmp_path / f'iter_{STOP_AT}.pth'
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['rng_states']['ranks'] = None
    torch.save(checkpoint, path)
    resumed = _runner(tmp_path, resume=True)
    with _log_records() as records:
        resumed.train()
    assert _hook_warnings(records) == [
        'RNGStateHook: the resumed run will not repeat the uninterrupted '
        'one exactly: the checkpoint was written outside training and holds '
        'no generator states; the generators are not restored; '
        'train_dataloader.num_workers is 0 here, 1 when the checkpoint was '
        'saved.'
    ]


# -- two processes --------------------------------------------------------
def _two_process_session(rank, world, out_dir):
    """Uninterrupted, stopped and resumed runs in two gloo processes, with
    a worker per process and a seed per process (diff_rank_seed): each
    process restores its own generators and worker seed."""
    os.environ['LOCAL_RANK'] = str(rank)  # read by mmengine's DDP wrapping
    kwargs = dict(world_size=world, num_workers=1)
    whole = _runner(os.path.join(out_dir, 'whole'), **kwargs)
    whole.train()
    _stop_early(_runner(os.path.join(out_dir, 'cut'), **kwargs))
    resumed = _runner(os.path.join(out_dir, 'cut'), resume=True, **kwargs)
    with _log_records() as records:
        resumed.train()
    torch.save(dict(whole=_weights(whole), resumed=_weights(resumed),
                    warnings=_hook_warnings(records)),
               os.path.join(out_dir, f'rank{rank}.pth'))


def test_two_processes_resume_exactly_and_one_process_warns(tmp_path):
    codes = run_processes(_two_process_session, 2, tmp_path, str(tmp_path))
    assert codes == [0, 0], f'exit codes {codes} (None: hung)'
    for rank in range(2):
        got = torch.load(tmp_path / f'rank{rank}.pth', weights_only=False)
        different = _differences(got['whole'], got['resumed'])
        # the checkpoint holds rank 0's SN running statistics (DDP does not
        # sync buffers here): rank 1 resumes with those, as with BN
        assert different == ([] if rank == 0 else
                             ['sn.running_mean', 'sn.running_var'])
        assert got['warnings'] == []
    saved = torch.load(tmp_path / 'cut' / f'iter_{STOP_AT}.pth',
                       weights_only=False)['rng_states']
    assert saved['world_size'] == 2
    worker_seeds = [r['worker_seed'] for r in saved['ranks']]
    assert worker_seeds == [SEED, SEED + 1]  # diff_rank_seed

    # the same checkpoint resumed by one process
    single = _runner(tmp_path / 'single', num_workers=1, resume=True,
                     load_from=str(tmp_path / 'cut' / f'iter_{STOP_AT}.pth'))
    with _log_records() as records:
        single.train()
    assert _hook_warnings(records) == [
        'RNGStateHook: the resumed run will not repeat the uninterrupted '
        'one exactly: 2 processes saved the checkpoint, 1 resume it; the '
        'generators are not restored.'
    ]
