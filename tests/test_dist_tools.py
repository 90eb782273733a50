"""The distributed tools on a CPU-only machine (gloo), for real.

``tools/dist_train.sh`` with 2 processes trains an SN config on generated
data and writes a checkpoint, ``tools/dist_test.sh`` evaluates it,
``--resume`` continues with the same iteration count and optimizer state,
two "nodes" (two torchrun launches with ``--nnodes 2`` on the loopback
address) train together, a fake ``srun`` drives ``tools/slurm_train.sh``,
and killing one rank ends the run with an error within a bounded time.

Every subprocess runs in its own session with a timeout; on timeout the
whole session (torchrun and its workers) is killed.
"""
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from _zoo_data import (REPO, cfg_options_for_tiny_data, free_port,
                       make_imagenet_folder, subprocess_env, venv_bin)

CONFIG = 'configs/resnet50_sn_8xb4.py'
# 3 classes x 4 training images; 2 processes x 2 images -> 3 iterations
# per epoch (6 with one process).
NUM_TRAIN = 12
ITERS_PER_EPOCH = NUM_TRAIN // (2 * 2)
TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    not Path(venv_bin(), 'python').exists(), reason='needs the venv python')


def _env(path_prefix=None, **extra):
    path = f'{venv_bin()}{os.pathsep}{os.environ.get("PATH", "")}'
    if path_prefix:
        path = f'{path_prefix}{os.pathsep}{path}'
    return subprocess_env(
        PATH=path, PYTHON=str(Path(venv_bin(), 'python')), **extra)


def _start(cmd, log, **env):
    """Start ``cmd`` in a new session, stdout+stderr to ``log``."""
    with open(log, 'w') as f:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(**env),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True)


def _kill_session(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait(proc, log, timeout=TIMEOUT):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        pytest.fail(f'{proc.args} did not finish in {timeout}s:\n'
                    f'{_tail(log)}')
    return proc.returncode


def _tail(log, n=60):
    return '\n'.join(Path(log).read_text(errors='replace').splitlines()[-n:])


def _run(cmd, log, timeout=TIMEOUT, **env):
    proc = _start(cmd, log, **env)
    rc = _wait(proc, log, timeout)
    assert rc == 0, f'{cmd} failed ({rc}):\n{_tail(log)}'
    return Path(log).read_text(errors='replace')


def _options(data_root, *extra):
    # 32x32 crops keep the CPU iterations short; the model is untouched.
    return ['--cfg-options', *cfg_options_for_tiny_data(
        data_root, crop=32, resize=36), 'default_hooks.logger.interval=1',
            *extra]


def _load(path):
    from mmsn.utils import mmengine_checkpoint_globals
    with mmengine_checkpoint_globals():  # mmengine's message hub types
        return torch.load(path, map_location='cpu')


def _val_top1(log_text, mode='val'):
    found = re.findall(rf'Epoch\({mode}\).*accuracy/top1: ([0-9.]+)',
                       log_text)
    assert found, f'no {mode} result in the log'
    return float(found[-1])


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_imagenet_folder(
        tmp_path_factory.mktemp('imagenet'), num_classes=3,
        train_per_class=NUM_TRAIN // 3, val_per_class=2)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_root):
    """One epoch of ``dist_train.sh CONFIG 2`` into a fresh work dir."""
    work_dir = tmp_path_factory.mktemp('work')
    log = work_dir / 'train_1.log'
    text = _run([
        'bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir',
        str(work_dir), *_options(data_root, 'train_cfg.max_epochs=1')
    ],
                log,
                PORT=free_port())
    yield work_dir, text
    _remove_checkpoints(work_dir)


def _remove_checkpoints(directory):
    # ResNet-50 + momentum is ~200 MB a file; pytest keeps old tmp dirs.
    for ckpt in Path(directory).rglob('*.pth'):
        ckpt.unlink()


def test_dist_train_two_cpu_processes(trained):
    work_dir, text = trained
    assert 'Distributed training: True' in text
    assert "backend='gloo'" in text or "'backend': 'gloo'" in text
    assert f'Epoch(train) [1][{ITERS_PER_EPOCH}/{ITERS_PER_EPOCH}]' in text
    ckpt = _load(work_dir / 'epoch_1.pth')
    assert ckpt['meta']['epoch'] == 1
    # 12 images over 2 processes x 2 images: both ranks took part.
    assert ckpt['meta']['iter'] == ITERS_PER_EPOCH
    state = ckpt['state_dict']
    assert 'backbone.layer1.0.sn1.mean_weight' in state
    assert 'backbone.layer1.0.sn3.running_mean' in state
    assert 'head.fc.weight' in state
    assert ckpt['optimizer']['state'], 'no SGD momentum buffers saved'


def test_dist_test_evaluates_the_checkpoint(trained, data_root, tmp_path):
    work_dir, _ = trained
    out = tmp_path / 'metrics.pkl'
    _run([
        'bash', 'tools/dist_test.sh', CONFIG,
        str(work_dir / 'epoch_1.pth'), '2', '--work-dir',
        str(tmp_path), '--out',
        str(out), '--out-item', 'metrics', *_options(data_root)
    ],
         tmp_path / 'test.log',
         PORT=free_port())
    with open(out, 'rb') as f:
        metrics = pickle.load(f)
    assert set(metrics) >= {'accuracy/top1', 'accuracy/top5'}
    # The same checkpoint in one process: the same result. (Not the training
    # run's own validation: there each process validated its half with its
    # own SN running statistics, as with BN, while the checkpoint holds
    # rank 0's.)
    single = tmp_path / 'single'
    _run([
        sys.executable, 'tools/test.py', CONFIG,
        str(work_dir / 'epoch_1.pth'), '--work-dir',
        str(single), *_options(data_root)
    ], tmp_path / 'test_single.log')
    reference = _val_top1((tmp_path / 'test_single.log').read_text(),
                          mode='test')
    assert metrics['accuracy/top1'] == pytest.approx(reference)


def test_resume_continues_iterations_and_optimizer(trained, data_root,
                                                   tmp_path):
    work_dir, _ = trained
    record = tmp_path / 'train_start.pth'
    # The zoo config plus a hook that records what training starts from.
    config = tmp_path / 'resume_cfg.py'
    config.write_text(
        textwrap.dedent(f"""\
        _base_ = [{str(REPO / CONFIG)!r}]
        custom_imports = dict(
            imports=['mmsn', 'mmsn.models.heads', '_zoo_data'],
            allow_failed_imports=False)
        custom_hooks = [
            dict(type='RecordTrainStartHook', out_file={str(record)!r})]
        """))
    text = _run([
        'bash', 'tools/dist_train.sh',
        str(config), '2', '--work-dir',
        str(work_dir), '--resume',
        *_options(data_root, 'train_cfg.max_epochs=2')
    ],
                tmp_path / 'train_2.log',
                PORT=free_port(),
                PYTHONPATH=f'{REPO}{os.pathsep}{REPO / "tests"}')

    saved = _load(work_dir / 'epoch_1.pth')
    start = _load(record)
    assert (start['epoch'], start['iter']) == (1, ITERS_PER_EPOCH)
    # The optimizer resumed with the saved momentum buffers, not fresh ones.
    assert start['optimizer']['state'].keys() == saved['optimizer'][
        'state'].keys()
    for key, buf in saved['optimizer']['state'].items():
        assert torch.equal(start['optimizer']['state'][key]['momentum_buffer'],
                           buf['momentum_buffer'])
    assert start['optimizer']['param_groups'][0]['lr'] == pytest.approx(
        saved['optimizer']['param_groups'][0]['lr'])
    assert 'Epoch(train) [1]' not in text
    assert f'Epoch(train) [2][{ITERS_PER_EPOCH}/{ITERS_PER_EPOCH}]' in text
    final = _load(work_dir / 'epoch_2.pth')
    assert final['meta']['iter'] == 2 * ITERS_PER_EPOCH
    record.unlink()


def test_two_nodes_on_loopback_train_together(data_root, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        procs.append((_start(
            [
                'bash', 'tools/dist_train.sh', CONFIG, '1', '--work-dir',
                str(tmp_path / f'node{node}'),
                *_options(data_root, 'train_cfg.max_epochs=1')
            ],
            tmp_path / f'node{node}.log',
            NNODES=2,
            NODE_RANK=node,
            PORT=port,
            MASTER_ADDR='127.0.0.1'), tmp_path / f'node{node}.log'))
    try:
        for proc, log in procs:
            assert _wait(proc, log) == 0, _tail(log)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                _kill_session(proc)
    # One process per node, 2 in all: half the iterations of one process.
    ckpt = _load(tmp_path / 'node0' / 'epoch_1.pth')
    assert ckpt['meta']['iter'] == ITERS_PER_EPOCH
    text = (tmp_path / 'node0.log').read_text()
    assert 'Distributed training: True' in text
    assert f'Epoch(train) [1][{ITERS_PER_EPOCH}/{ITERS_PER_EPOCH}]' in text
    _remove_checkpoints(tmp_path)


def test_slurm_train_with_a_fake_srun(data_root, tmp_path):
    """``slurm_train.sh`` through an ``srun`` that starts the tasks locally
    with the variables Slurm sets (SLURM_PROCID, SLURM_NTASKS, ...)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    srun = bin_dir / 'srun'
    srun.write_text(
        textwrap.dedent("""\
        #!/usr/bin/env bash
        # Minimal local srun: parse --ntasks, start the command per task.
        ntasks=1
        while [[ $# -gt 0 && $1 == -* ]]; do
            case $1 in
                --ntasks=*) ntasks=${1#*=} ;;
                -p) shift ;;
            esac
            shift
        done
        pids=()
        for ((i = 0; i < ntasks; i++)); do
            SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks \\
            SLURM_NODELIST=localhost "$@" &
            pids+=($!)
        done
        rc=0
        for p in "${pids[@]}"; do wait $p || rc=1; done
        exit $rc
        """))
    srun.chmod(0o755)
    work_dir = tmp_path / 'work'
    log = tmp_path / 'slurm.log'
    _run([
        'bash', 'tools/slurm_train.sh', 'cpu', 'sn-test', CONFIG,
        str(work_dir), *_options(data_root, 'train_cfg.max_epochs=1')
    ],
         log,
         path_prefix=bin_dir,
         GPUS=2,
         GPUS_PER_NODE=2,
         GRES='',
         MASTER_PORT=free_port())
    ckpt = _load(work_dir / 'epoch_1.pth')
    assert ckpt['meta']['iter'] == ITERS_PER_EPOCH
    assert 'Distributed launcher: slurm' in log.read_text()
    _remove_checkpoints(work_dir)


def _rank_workers(root):
    """{RANK: pid} of the training processes descending from ``root``."""
    parents, info = {}, {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            stat = Path(f'/proc/{pid}/stat').read_text()
            # Fields after the parenthesised command: state ppid ...
            parents[int(pid)] = int(stat.rsplit(')', 1)[1].split()[1])
            info[int(pid)] = (
                Path(f'/proc/{pid}/environ').read_bytes().split(b'\0'),
                Path(f'/proc/{pid}/cmdline').read_bytes())
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid):
        while pid in parents and pid != root:
            pid = parents[pid]
        return pid == root

    workers = {}
    for pid, (env, cmd) in info.items():
        ranks = [e[5:] for e in env if e.startswith(b'RANK=')]
        if ranks and b'tools/train.py' in cmd and descends(pid):
            workers[int(ranks[0])] = pid
    return workers


def test_killing_one_rank_fails_the_run_in_bounded_time(data_root, tmp_path):
    log = tmp_path / 'train.log'
    proc = _start([
        'bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir',
        str(tmp_path / 'work'),
        *_options(data_root, 'train_cfg.max_epochs=100',
                  'train_cfg.val_interval=1000',
                  'default_hooks.checkpoint.interval=1000',
                  'env_cfg.dist_cfg.timeout=60')
    ],
                  log,
                  PORT=free_port())
    try:
        deadline = time.monotonic() + TIMEOUT
        started = re.compile(r'Epoch\(train\) +\[1\]\[1/')
        while not started.search(log.read_text(errors='replace')):
            assert proc.poll() is None, f'run ended early:\n{_tail(log)}'
            assert time.monotonic() < deadline, 'training never started'
            time.sleep(0.5)
        workers = _rank_workers(proc.pid)
        assert sorted(workers) == [0, 1], workers
        killed_at = time.monotonic()
        survivor = workers[0]
        os.kill(workers[1], signal.SIGKILL)
        rc = _wait(proc, log, timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            _kill_session(proc)
    assert rc != 0, 'the run reported success after losing a rank'
    assert elapsed < 90
    text = log.read_text(errors='replace')
    assert 'ChildFailedError' in text and 'SIGKILL' in text
    # Rank 0 did not survive as an orphan either.
    assert not Path(f'/proc/{survivor}').exists() or \
        Path(f'/proc/{survivor}/stat').read_text().split()[2] == 'Z'



def test_mmpretrain_own_train_py_runs_the_config(data_root, tmp_path):
    """What ``mim train mmpretrain CONFIG`` runs: mmpretrain's packaged
    ``tools/train.py``, which knows nothing of mmsn; the config's
    ``custom_imports`` must be enough."""
    import mmpretrain
    train_py = Path(mmpretrain.__file__).parent / '.mim' / 'tools' / 'train.py'
    if not train_py.is_file():
        pytest.skip('mmpretrain was installed without its .mim tools')
    work_dir = tmp_path / 'work'
    # A scratch copy of the environment without the repo on PYTHONPATH:
    # mmsn must come from the installed package, as for a mim user.
    text = _run([
        str(Path(venv_bin(), 'python')),
        str(train_py), 'configs/resnet50_sn_8xb32.py', '--work-dir',
        str(work_dir), *_options(data_root, 'train_cfg.max_epochs=1')
    ],
                tmp_path / 'mim.log',
                PYTHONPATH='')
    assert 'Epoch(train) [1][6/6]' in text  # 12 images, one process
    ckpt = _load(work_dir / 'epoch_1.pth')
    assert 'backbone.layer1.0.sn1.mean_weight' in ckpt['state_dict']
    _remove_checkpoints(work_dir)
