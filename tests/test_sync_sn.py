"""SyncSN in 2 and 3 gloo processes against SN on the joined batch.

Each world size runs one session of spawned processes that plays every
scenario in turn and saves what each process saw; the tests compare that
with single-process SN (and a float64 reference) computed here.
"""
import os
import signal
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _dist import run_processes
from mmsn.analysis.host_path import HOST_SYNC, count_dispatch
from mmsn import (SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                  SyncSwitchableNorm)
from test_switchable_norm import C, make_input, make_layer

# Samples per process, by world size.
UNEQUAL = {2: (3, 1), 3: (3, 1, 2), 4: (3, 1, 2, 1)}
WITH_EMPTY = {2: (0, 3), 3: (2, 0, 3), 4: (2, 0, 3, 1)}
# Input shape after N, and the SN class for it in a single process.
SHAPES = {
    '2d': ((C, ), SwitchableNorm1d),
    '3d': ((C, 4), SwitchableNorm1d),
    '4d': ((C, 3, 2), SwitchableNorm2d),
    '5d': ((C, 2, 2, 3), SwitchableNorm3d),
}
# (std, mean) of the precision batches: a large mean against the spread
OFFSETS = ((2.0, 255.0), (2.0, 1e3), (2.0, 1e4), (0.1, 1e4))
PRECISION_SHAPE = (8, 4, 5, 5)
# how the precision batch is split: empty and one-sample parts included
PRECISION_SIZES = {2: (4, 4), 3: (1, 0, 7), 4: (3, 0, 1, 4)}
# rounding errors vary from batch to batch: compare the largest over several
PRECISION_SEEDS = range(6)
STEPS = 3


# --- data, the same in every process and here -------------------------------
def joined_batch(sizes, shape, seed, dtype=torch.float64):
    full = (sum(sizes), ) + shape
    g = torch.randn(full, generator=torch.Generator().manual_seed(seed + 99),
                    dtype=torch.float64)
    return make_input(full, dtype, seed), g.to(dtype)


def part(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def precision_batch(offset, seed):
    std, mean = offset
    gen = torch.Generator().manual_seed(int(mean / std) + seed)
    x = torch.randn(PRECISION_SHAPE, generator=gen, dtype=torch.float64)
    g = torch.randn(PRECISION_SHAPE, generator=gen, dtype=torch.float64)
    return x * std + mean, g


def step(layer, x, g):
    """Forward and backward; what the step produced."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    out = dict(y=y.detach(), x_grad=x.grad,
               grads={n: p.grad.clone() for n, p in layer.named_parameters()})
    if layer.using_bn:
        out['running'] = (layer.running_mean.clone(),
                          layer.running_var.clone(),
                          int(layer.num_batches_tracked))
    layer.zero_grad()
    return out


def tiny_model(norm_cls):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, C, 3, padding=1), norm_cls(C), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 3)).double()


def training_data(sizes, step_idx):
    gen = torch.Generator().manual_seed(50 + step_idx)
    x = torch.randn((sum(sizes), 2, 4, 4), generator=gen,
                    dtype=torch.float64) * 3 + 1
    labels = torch.randint(0, 3, (sum(sizes), ), generator=gen)
    return x, labels


# --- what each process does --------------------------------------------------
class _CountingAllReduce:

    def __init__(self):
        self.calls = 0
        self.original = dist.all_reduce

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def _in_step(world, results, tag):
    """All processes still pair their collectives: a marker all-reduce
    must see every rank's marker."""
    marker = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(marker)
    results[f'{tag}/in_step'] = float(marker) == world * (world + 1) / 2


def _session(rank, world, out_dir):
    results = {}
    counter = _CountingAllReduce()
    dist.all_reduce = counter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for name, (shape, _) in SHAPES.items():
            sizes = UNEQUAL[world]
            layer = make_layer(SyncSwitchableNorm, momentum=0.1)
            x, g = joined_batch(sizes, shape, seed=len(shape))
            results[f'unequal/{name}'] = step(layer, part(x, sizes, rank),
                                              part(g, sizes, rank))

        for mode, kwargs in (('moving', {}), ('batch_average',
                                              dict(moving_average=False))):
            sizes = WITH_EMPTY[world]
            layer = make_layer(SyncSwitchableNorm, **kwargs)
            for i in range(STEPS):
                x, g = joined_batch(sizes, SHAPES['4d'][0], seed=10 + i)
                results[f'empty/{mode}/{i}'] = step(
                    layer, part(x, sizes, rank), part(g, sizes, rank))
            _in_step(world, results, f'empty/{mode}')
            layer.eval()
            x, _ = joined_batch(UNEQUAL[world], SHAPES['4d'][0], seed=20)
            results[f'empty/{mode}/eval'] = layer(
                part(x, UNEQUAL[world], rank)).detach()

        # a NaN on the last process only: it is told about its input, the
        # others (an empty one among them) about the pooled statistics; a
        # step reads nothing back to the host
        sizes = WITH_EMPTY[world]
        layer = make_layer(SyncSwitchableNorm)
        x, g = joined_batch(sizes, SHAPES['4d'][0], seed=50)
        x[sum(sizes[:-1])] = float('nan')
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with warnings.catch_warnings(record=True) as nan_caught:
            warnings.simplefilter('always')
            xr = part(x, sizes, rank).detach().requires_grad_()
            ops = count_dispatch(
                lambda: layer(xr).backward(part(g, sizes, rank)))
        results['nan'] = dict(
            warnings=[str(w.message) for w in nan_caught],
            nonfinite=layer.nonfinite.tolist(), syncs=ops[HOST_SYNC],
            kept=all(torch.equal(v, layer.state_dict()[k])
                     for k, v in before.items()))

        # nobody has a sample: nothing to pool, nothing to warn about
        layer = make_layer(SyncSwitchableNorm)
        with warnings.catch_warnings(record=True) as none_caught:
            warnings.simplefilter('always')
            results['all_empty'] = step(
                layer, torch.zeros(0, C, 3, 3, dtype=torch.float64),
                torch.zeros(0, C, 3, 3, dtype=torch.float64))
        results['all_empty/warnings'] = [str(w.message) for w in none_caught]
        _in_step(world, results, 'all_empty')

        # no collective at all: eval mode, and no BN branch
        for case, layer in (('eval', make_layer(SyncSwitchableNorm).eval()),
                            ('no_bn', make_layer(SyncSwitchableNorm,
                                                 using_bn=False))):
            x, g = joined_batch(UNEQUAL[world], SHAPES['4d'][0], seed=30)
            before = counter.calls
            out = step(layer, part(x, UNEQUAL[world], rank),
                       part(g, UNEQUAL[world], rank))
            out['collectives'] = counter.calls - before
            results[f'local/{case}'] = out

        if world == 3:
            # Ranks 0 and 1 pool; rank 2 is outside the group.
            group = dist.new_group([0, 1])
            layer = make_layer(SyncSwitchableNorm, process_group=group)
            x, g = joined_batch(UNEQUAL[world], SHAPES['4d'][0], seed=40)
            results['subset'] = step(layer, part(x, UNEQUAL[world], rank),
                                     part(g, UNEQUAL[world], rank))
            _in_step(world, results, 'subset')

        sizes = PRECISION_SIZES[world]
        for offset in OFFSETS:
            for seed in PRECISION_SEEDS:
                x, g = precision_batch(offset, seed)
                results[f'precision/{offset}/{seed}'] = step(
                    SyncSwitchableNorm(PRECISION_SHAPE[1]),
                    part(x, sizes, rank).float(),
                    part(g, sizes, rank).float())

        # A small network trained with DDP, SN converted to SyncSN.
        sizes = UNEQUAL[world]
        model = SyncSwitchableNorm.convert_sync_switchable_norm(
            tiny_model(SwitchableNorm2d))
        ddp = nn.parallel.DistributedDataParallel(model)
        optim = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for i in range(STEPS):
            x, labels = training_data(sizes, i)
            logits = ddp(part(x, sizes, rank))
            # DDP averages the gradients of the processes' losses: scale so
            # that they add up to the mean loss of the joined batch
            loss = F.cross_entropy(
                logits, part(labels, sizes, rank),
                reduction='sum') * world / sum(sizes)
            optim.zero_grad()
            loss.backward()
            results[f'train/{i}'] = dict(
                logits=logits.detach(),
                grads={n: p.grad.clone()
                       for n, p in model.named_parameters()})
            optim.step()
        results['train/state'] = {
            k: v.clone()
            for k, v in model.state_dict().items()
        }
    results['warnings'] = [(w.category.__name__, str(w.message))
                           for w in caught]
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pth'))


@pytest.fixture(scope='module', params=[2, 3, 4],
                ids=['2proc', '3proc', '4proc'])
def session(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f'sync{world}')
    codes = run_processes(_session, world, tmp, str(tmp))
    assert codes == [0] * world, f'exit codes {codes} (None: hung)'
    return world, [
        torch.load(tmp / f'rank{r}.pth', weights_only=False)
        for r in range(world)
    ]


# --- single-process references -----------------------------------------------
def assert_joined_equal_sn(results, reference, sizes):
    """Outputs and input gradients joined over the processes, summed
    parameter gradients and every process's running statistics equal SN's
    on the joined batch."""
    present = [r for r, n in zip(results, sizes) if n > 0]
    torch.testing.assert_close(torch.cat([r['y'] for r in present]),
                               reference['y'])
    torch.testing.assert_close(
        torch.cat([r['x_grad'] for r in present]), reference['x_grad'])
    for r, n in zip(results, sizes):
        assert r['y'].shape[0] == n and r['x_grad'].shape[0] == n
    for name, grad in reference['grads'].items():
        # each process holds the gradient of its own loss; DDP sums them
        torch.testing.assert_close(
            sum(r['grads'][name] for r in results), grad,
            msg=lambda m: f'{name}: {m}')
    if 'running' in reference:
        for r in results:
            torch.testing.assert_close(r['running'][:2],
                                       reference['running'][:2])
            assert r['running'][2] == reference['running'][2]


@pytest.mark.parametrize('name', list(SHAPES))
def test_unequal_batches_equal_sn_on_joined_batch(session, name):
    world, ranks = session
    shape, cls = SHAPES[name]
    x, g = joined_batch(UNEQUAL[world], shape, seed=len(shape))
    reference = step(make_layer(cls, momentum=0.1), x, g)
    assert_joined_equal_sn([r[f'unequal/{name}'] for r in ranks], reference,
                           UNEQUAL[world])


@pytest.mark.parametrize('mode', ['moving', 'batch_average'])
def test_empty_batch_takes_part_and_equals_sn(session, mode):
    world, ranks = session
    sizes = WITH_EMPTY[world]
    layer = make_layer(SwitchableNorm2d,
                       moving_average=mode == 'moving')
    for i in range(STEPS):
        x, g = joined_batch(sizes, SHAPES['4d'][0], seed=10 + i)
        assert_joined_equal_sn([r[f'empty/{mode}/{i}'] for r in ranks],
                               step(layer, x, g), sizes)
    # the empty process ran every collective, in order
    assert all(r[f'empty/{mode}/in_step'] for r in ranks)
    # the pooled running statistics serve every process in eval
    layer.eval()
    x, _ = joined_batch(UNEQUAL[world], SHAPES['4d'][0], seed=20)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.cat([r[f'empty/{mode}/eval'] for r in ranks]), layer(x))


def test_all_processes_empty_keeps_running_statistics(session):
    world, ranks = session
    initial = make_layer(SwitchableNorm2d)
    for r in ranks:
        result = r['all_empty']
        assert result['y'].shape == (0, C, 3, 3)
        assert r['all_empty/warnings'] == []
        assert r['all_empty/in_step']
        torch.testing.assert_close(
            result['running'],
            (initial.running_mean, initial.running_var, 0))
        for grad in result['grads'].values():
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize('case', ['eval', 'no_bn'])
def test_no_collective_without_batch_statistics(session, case):
    world, ranks = session
    sizes = UNEQUAL[world]
    x, g = joined_batch(sizes, SHAPES['4d'][0], seed=30)
    for rank, r in enumerate(ranks):
        result = r[f'local/{case}']
        assert result['collectives'] == 0
        layer = make_layer(SwitchableNorm2d, using_bn=case != 'no_bn')
        layer.train(case != 'eval')
        reference = step(layer, part(x, sizes, rank), part(g, sizes, rank))
        torch.testing.assert_close(result['y'], reference['y'])
        torch.testing.assert_close(result['x_grad'], reference['x_grad'])
        for name, grad in reference['grads'].items():
            torch.testing.assert_close(result['grads'][name], grad)


def test_subset_process_group_pools_its_members_only(session):
    world, ranks = session
    if world != 3:
        pytest.skip('the subset case runs with 3 processes')
    sizes = UNEQUAL[world]
    x, g = joined_batch(sizes, SHAPES['4d'][0], seed=40)
    members = sizes[:2]
    reference = step(make_layer(SwitchableNorm2d), x[:sum(members)],
                     g[:sum(members)])
    assert_joined_equal_sn([r['subset'] for r in ranks[:2]], reference,
                           members)
    alone = step(make_layer(SwitchableNorm2d), part(x, sizes, 2),
                 part(g, sizes, 2))
    assert_joined_equal_sn([ranks[2]['subset']], alone, sizes[2:])
    assert all(r['subset/in_step'] for r in ranks)


def test_multi_process_training_equals_single_process(session):
    world, ranks = session
    sizes = UNEQUAL[world]
    model = tiny_model(SwitchableNorm2d)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(STEPS):
        x, labels = training_data(sizes, i)
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optim.zero_grad()
        loss.backward()
        torch.testing.assert_close(
            torch.cat([r[f'train/{i}']['logits'] for r in ranks]), logits)
        for name, p in model.named_parameters():
            for r in ranks:  # DDP gives every process the summed gradient
                torch.testing.assert_close(r[f'train/{i}']['grads'][name],
                                           p.grad,
                                           msg=lambda m: f'{name}: {m}')
        optim.step()
    for key, value in model.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r['train/state'][key], value)


def test_non_finite_elsewhere_is_reported_as_such_without_a_sync(session):
    world, ranks = session
    nan_rank = world - 1
    for rank, r in enumerate(ranks):
        result = r['nan']
        assert result['syncs'] == 0
        assert result['kept']  # running statistics, num_batches_tracked
        if rank == nan_rank:
            expected = ('SyncSwitchableNorm: non-finite batch statistics '
                        '(NaN or Inf in the input); running statistics keep '
                        'their last value.')
            assert result['nonfinite'] == [1, 0, 0, 0]
        else:
            expected = ('SyncSwitchableNorm: non-finite batch statistics '
                        'pooled across processes (this process\'s input is '
                        'finite or empty: NaN or Inf in another process\'s '
                        'input, or statistics that overflowed); running '
                        'statistics keep their last value.')
            assert result['nonfinite'] == [0, 0, 0, 1]
        assert result['warnings'] == [expected], (rank, result)


def test_no_deprecated_collective_warning(session):
    _, ranks = session
    for r in ranks:
        assert not [w for w in r['warnings']
                    if 'all_reduce' in w[1] or w[0] == 'FutureWarning'], \
            r['warnings']


def _flat(result):
    out = dict(y=result['y'], x_grad=result['x_grad'], **result['grads'])
    out['running_mean'], out['running_var'] = result['running'][:2]
    return out


@pytest.mark.parametrize('offset', OFFSETS, ids=lambda o: f'{o[0]}@{o[1]}')
def test_precision_within_twice_single_process_sn(session, offset):
    """Pooled statistics lose no more than SN on the joined batch: largest
    error over a few batches against float64, at a large mean against the
    spread, with the batch split unevenly (empty and one-sample parts)."""
    world, ranks = session
    channels = PRECISION_SHAPE[1]
    sync_errors, sn_errors, floors = {}, {}, {}
    for seed in PRECISION_SEEDS:
        x, g = precision_batch(offset, seed)
        exact = _flat(step(SwitchableNorm2d(channels).double(), x, g))
        sn = _flat(step(SwitchableNorm2d(channels), x.float(), g.float()))
        results = [r[f'precision/{offset}/{seed}'] for r in ranks]
        sync = _flat(dict(
            y=torch.cat([r['y'] for r in results]),
            x_grad=torch.cat([r['x_grad'] for r in results]),
            grads={n: sum(r['grads'][n] for r in results)
                   for n in results[0]['grads']},
            running=results[0]['running']))
        for k, value in exact.items():
            for errors, result in ((sync_errors, sync), (sn_errors, sn)):
                error = (result[k].double() - value).abs().max().item()
                errors[k] = max(errors.get(k, 0.0), error)
            # float32 rounding of the exact value: the floor of any float32
            # computation
            floors[k] = max(floors.get(k, 0.0), torch.finfo(
                torch.float32).eps * value.abs().max().item())
    print(f'\n{world} processes, std {offset[0]:g}, mean {offset[1]:g}, '
          f'largest error vs float64 over '
          f'{len(PRECISION_SEEDS)} batches, SyncSN / SN: ' + ', '.join(
              f'{k} {sync_errors[k]:.2e} / {sn_errors[k]:.2e}'
              for k in sn_errors))
    for k, sn_error in sn_errors.items():
        assert sync_errors[k] <= 2 * sn_error + floors[k], (
            k, sync_errors[k], sn_error)


# --- a process that dies -----------------------------------------------------
def _die_or_train(rank, world, out_dir):
    layer = make_layer(SyncSwitchableNorm, dtype=torch.float32)
    x = make_input((2, C, 3, 3), torch.float32)
    layer(x)  # one good step
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    message = 'no error'
    try:
        for _ in range(100):
            layer(x)
    except RuntimeError as err:
        message = str(err)
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(message)
    os._exit(0)  # the group cannot be torn down politely any more


@pytest.mark.parametrize('world', [2, 3])
def test_a_dying_process_ends_the_others_with_a_clear_error(tmp_path, world):
    codes = run_processes(_die_or_train, world, tmp_path, str(tmp_path),
                          timeout=240)
    assert codes[1] == -signal.SIGKILL
    for rank in set(range(world)) - {1}:
        assert codes[rank] == 0, codes
        message = (tmp_path / f'rank{rank}.txt').read_text()
        assert message.startswith(
            f'SyncSwitchableNorm: the all-reduce of the BN statistics over '
            f'{world} processes failed. Another process of the group has '
            f'probably exited'), message
