"""SNBatchAverageHook in real (tiny) training runs: when it fills (every
``interval`` and at the end), what it fills (only batch-average SN, from the
final weights), loaders with a batch sampler, and two processes (plain SN
pooled over both, SyncSN as it pooled)."""
import os

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

import mmsn  # noqa: F401  (registers the hook)
from _dist import run_processes
from mmsn import SwitchableNorm2d, SyncSwitchableNorm
from sn_reference import batch_stats
from test_importance import ToyData as Data

BATCH = 4
FILL_SAMPLES = 8  # two batches


class Net(BaseModel):
    """A batch-average SN (or SyncSN) between a BN and a moving-average SN.
    """

    def __init__(self, batch_average_cls=SwitchableNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.sn_batch = batch_average_cls(4, moving_average=False)
        self.bn = nn.BatchNorm2d(4)
        self.sn_moving = SwitchableNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, inputs, labels, mode='tensor'):
        h = self.sn_moving(self.bn(self.sn_batch(self.conv(inputs)).relu()))
        logits = self.fc(h.relu().mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        return logits


class Recorder(Hook):
    """The model's state after each training iteration (the last one is
    what training left), the inputs of the batch-average layer, and those
    of each fill (the layer's inputs after a training step's hooks)."""
    priority = 'LOWEST'  # after SNBatchAverageHook

    def before_run(self, runner):
        self.inputs = []
        self.fills = []  # (epoch or iteration, inputs of the fill)
        model = runner.model.module if hasattr(runner.model, 'module') \
            else runner.model
        model.sn_batch.register_forward_hook(
            lambda m, args, out: self.inputs.append(args[0].detach()))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.trained_before = len(self.inputs)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        model = runner.model.module if hasattr(runner.model, 'module') \
            else runner.model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self._note_fill(runner.iter + 1, self.trained_before + 1)
        self.after_training = len(self.inputs)

    def after_train_epoch(self, runner):
        self._note_fill(runner.epoch + 1, self.after_training)

    def _note_fill(self, when, start):
        if len(self.inputs) > start:
            self.fills.append((when, self.inputs[start:]))
            self.inputs = self.inputs[:start]


def _pooled(batches):
    """Batch-average pooling of the batches: mean of the batch means, mean
    of the batch second moments minus the squared mean."""
    stats = [batch_stats(x.double(), unbiased=True) for x in batches]
    mean = torch.stack([m for m, _ in stats]).mean(0)
    second = torch.stack([v + m**2 for m, v in stats]).mean(0)
    return mean, second - mean**2


def _assert_filled_from(layer, batches):
    mean, var = _pooled(batches)
    torch.testing.assert_close(layer.running_mean.double(), mean,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5,
                               atol=1e-6)
    assert int(layer.num_batches_tracked) == len(batches)


def test_hook_fills_every_interval_and_at_the_end_batch_average_sn_only(
        tmp_path):
    recorder = Recorder()
    runner = Runner(
        model=Net(),
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(Data(), batch_size=BATCH, shuffle=False),
        # 3 epochs, interval 2: fills after epoch 2 and after the last
        train_cfg=dict(by_epoch=True, max_epochs=3),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1)),
        custom_hooks=[
            dict(type='SNBatchAverageHook', num_samples=FILL_SAMPLES,
                 interval=2), recorder
        ],
        default_scope='mmengine')
    runner.train()
    model = runner.model
    assert [when for when, _ in recorder.fills] == [2, 3]

    # the last fill ran the first FILL_SAMPLES training samples through the
    # final weights, after the last training iteration
    fill_inputs = recorder.fills[-1][1]
    assert len(fill_inputs) == FILL_SAMPLES // BATCH
    loader = DataLoader(Data(), batch_size=BATCH, shuffle=False)
    for batch, seen in zip(loader, fill_inputs):
        expected = model.conv(batch['inputs'])
        torch.testing.assert_close(seen, expected)
    layer = model.sn_batch
    _assert_filled_from(layer, fill_inputs)

    # everything else is as training left it: weights, BN and the
    # moving-average SN
    for key, value in model.state_dict().items():
        if not key.startswith('sn_batch.') or key in (
                'sn_batch.weight', 'sn_batch.bias', 'sn_batch.mean_weight',
                'sn_batch.var_weight'):
            assert torch.equal(value, recorder.state[key]), key
    # the checkpoint written after the last fill holds the filled
    # statistics; one of an epoch without a fill, those of training
    saved = torch.load(tmp_path / 'epoch_3.pth', weights_only=False)
    assert torch.equal(saved['state_dict']['sn_batch.running_var'],
                       layer.running_var)
    assert torch.equal(saved['state_dict']['bn.running_var'],
                       recorder.state['bn.running_var'])
    first = torch.load(tmp_path / 'epoch_1.pth', weights_only=False)
    assert int(first['state_dict']['sn_batch.num_batches_tracked']) == \
        len(Data()) // BATCH


def test_iteration_based_fills_every_interval_and_at_the_end(tmp_path):
    recorder = Recorder()
    Runner(
        model=Net(),
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(Data(), batch_size=BATCH, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=5),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        custom_hooks=[
            dict(type='SNBatchAverageHook', num_samples=3 * BATCH,
                 interval=2), recorder
        ],
        default_scope='mmengine').train()
    assert [(when, len(inputs)) for when, inputs in recorder.fills] == \
        [(2, 3), (4, 3), (5, 3)]


def test_loader_with_a_batch_sampler(tmp_path):
    """mmdet builds its train loaders with a batch sampler: the loader's
    batch_size is None, the batch sampler's counts."""
    loader = DataLoader(
        Data(), batch_sampler=BatchSampler(SequentialSampler(Data()), BATCH,
                                           drop_last=False))
    assert loader.batch_size is None
    recorder = Recorder()
    runner = Runner(
        model=Net(),
        work_dir=str(tmp_path),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=True, max_epochs=1),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        custom_hooks=[
            dict(type='SNBatchAverageHook', num_samples=3 * BATCH), recorder
        ],
        default_scope='mmengine')
    runner.train()
    [(_, fill_inputs)] = recorder.fills
    assert len(fill_inputs) == 3
    _assert_filled_from(runner.model.sn_batch, fill_inputs)


def test_loader_without_a_batch_size_is_refused_with_a_clear_error(
        tmp_path):
    loader = DataLoader(Data(), batch_sampler=[[0, 1, 2], [3, 4, 5]])
    runner = Runner(
        model=Net(),
        work_dir=str(tmp_path),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=True, max_epochs=1),
        # it needs a sampler behind the batch sampler
        default_hooks=dict(sampler_seed=None),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        custom_hooks=[dict(type='SNBatchAverageHook')],
        default_scope='mmengine')
    with pytest.raises(ValueError, match=(
            r'SNBatchAverageHook: cannot tell how many samples a batch of '
            r'the train loader holds \(batch_size is None and its batch '
            r'sampler list has no batch_size\)')):
        runner.train()


# -- two processes ----------------------------------------------------------
DIST_BATCH = 2
DIST_FILL_SAMPLES = 8  # 2 batches of 2 in each of 2 processes


def _two_process_session(rank, world, out_dir):
    """One epoch (the last: the fill comes whatever the interval) in each
    process, with plain SN and with SyncSN."""
    os.environ['LOCAL_RANK'] = str(rank)  # read by mmengine's DDP wrapping
    results = {}
    for name, cls in (('sn', SwitchableNorm2d), ('sync', SyncSwitchableNorm)):
        torch.manual_seed(0)
        recorder = Recorder()
        runner = Runner(
            model=Net(cls),
            work_dir=os.path.join(out_dir, name),
            launcher='pytorch',
            cfg=dict(model_wrapper_cfg=dict(
                type='MMDistributedDataParallel', device_ids=None,
                broadcast_buffers=False)),
            env_cfg=dict(dist_cfg=dict(backend='gloo')),
            train_dataloader=dict(
                dataset=Data(), batch_size=DIST_BATCH,
                sampler=dict(type='DefaultSampler', shuffle=True),
                collate_fn=dict(type='default_collate')),
            train_cfg=dict(by_epoch=True, max_epochs=1),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
            custom_hooks=[
                dict(type='SNBatchAverageHook',
                     num_samples=DIST_FILL_SAMPLES, interval=5), recorder
            ],
            default_scope='mmengine')
        runner.train()
        layer = runner.model.module.sn_batch
        results[name] = dict(
            fills=recorder.fills,
            running=(layer.running_mean.clone(), layer.running_var.clone(),
                     int(layer.num_batches_tracked)))
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pth'))


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fill2')
    codes = run_processes(_two_process_session, 2, tmp, str(tmp))
    assert codes == [0, 0], f'exit codes {codes} (None: hung)'
    return tmp, [torch.load(tmp / f'rank{r}.pth', weights_only=False)
                 for r in range(2)]


def _fill_inputs(results, name):
    fills = [r[name]['fills'] for r in results]
    assert [[when for when, _ in f] for f in fills] == [[1], [1]]
    return [f[0][1] for f in fills]  # per process, its fill's batches


def test_two_processes_pool_sn_over_all_samples(two_processes):
    tmp, results = two_processes
    per_process = _fill_inputs(results, 'sn')
    # the samples are counted over both processes
    assert [x.shape[0] for inputs in per_process for x in inputs] == \
        [DIST_BATCH] * (DIST_FILL_SAMPLES // DIST_BATCH)
    # each process holds the pooling of every process's batches, as one
    # process running them all would; so does the checkpoint
    mean, var = _pooled([x for inputs in per_process for x in inputs])
    saved = torch.load(tmp / 'sn' / 'epoch_1.pth', weights_only=False)
    holders = [r['sn']['running'] for r in results] + [tuple(
        saved['state_dict'][f'sn_batch.{k}']
        for k in ('running_mean', 'running_var', 'num_batches_tracked'))]
    for running_mean, running_var, tracked in holders:
        torch.testing.assert_close(running_mean.double(), mean, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(running_var.double(), var, rtol=1e-5,
                                   atol=1e-6)
        assert int(tracked) == DIST_FILL_SAMPLES // DIST_BATCH


def test_two_processes_leave_sync_sn_as_it_pooled(two_processes):
    _, results = two_processes
    per_process = _fill_inputs(results, 'sync')
    # each forward of the fill pooled the processes' batches of that step
    joined = [torch.cat(step) for step in zip(*per_process)]
    assert len(joined) == DIST_FILL_SAMPLES // (2 * DIST_BATCH)
    mean, var = _pooled(joined)
    for r in results:
        running_mean, running_var, tracked = r['sync']['running']
        torch.testing.assert_close(running_mean.double(), mean, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(running_var.double(), var, rtol=1e-5,
                                   atol=1e-6)
        assert tracked == len(joined)
