"""Resuming the digits demo after kill -9 ends with the weights of an
uninterrupted run (RNGStateHook); without the hook it does not, and with
another number of dataloader workers it does not either and says so."""
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'resnet_sn_digits.py')
EPOCHS = 3
KILLED_AFTER = 2  # epochs, right after that epoch's checkpoint


def _train(work_dir, kill_after=0, resume=False, rng_hook=True,
           num_workers=0):
    """One training of the demo (run in a subprocess by the tests)."""
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    torch.set_num_threads(1)

    class KillAfterEpoch(Hook):

        def after_train_epoch(self, runner):
            if runner.epoch + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.work_dir = work_dir
    cfg.resume = resume
    # validate every epoch: after the checkpoint the killed run was cut at,
    # too, which the resumed run does not repeat
    cfg.train_cfg = dict(by_epoch=True, max_epochs=EPOCHS, val_interval=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    cfg.default_hooks.logger.interval = 45
    cfg.train_dataloader.num_workers = num_workers
    assert dict(type='RNGStateHook') in cfg.custom_hooks
    if not rng_hook:
        cfg.custom_hooks = [
            h for h in cfg.custom_hooks if h['type'] != 'RNGStateHook'
        ]
    runner = Runner.from_cfg(cfg)
    if kill_after:
        # after CheckpointHook (VERY_LOW): the checkpoint is on disk
        runner.register_hook(KillAfterEpoch(), priority='LOWEST')
    runner.train()


def _run(work_dir, **kwargs):
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(
                   [REPO, osp.join(REPO, 'tests'),
                    os.environ.get('PYTHONPATH', '')]))
    code = ('import sys; from test_resume import _train; '
            f'_train({str(work_dir)!r}, **{kwargs!r})')
    return subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, timeout=900)


def _final(work_dir):
    ckpt = torch.load(osp.join(work_dir, f'epoch_{EPOCHS}.pth'),
                      weights_only=False)
    return ckpt['state_dict'], ckpt['optimizer']['state']


def _differences(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_killed_and_resumed_demo_ends_bit_identical(tmp_path):
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    done = _run(whole)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _run(cut, kill_after=KILLED_AFTER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (cut / f'epoch_{KILLED_AFTER}.pth').exists()
    assert not (cut / f'epoch_{KILLED_AFTER + 1}.pth').exists()
    # the same checkpoint, resumed once without the hook (the control) and
    # once with two dataloader workers
    shutil.copytree(cut, tmp_path / 'control')
    shutil.copytree(cut, tmp_path / 'workers')

    resumed = _run(cut, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'random generators restored as saved at epoch 2' in \
        resumed.stdout + resumed.stderr

    weights, momentum = _final(whole)
    resumed_weights, resumed_momentum = _final(cut)
    assert _differences(weights, resumed_weights) == []
    for key, state in momentum.items():
        assert torch.equal(state['momentum_buffer'],
                           resumed_momentum[key]['momentum_buffer'])

    control = _run(tmp_path / 'control', resume=True, rng_hook=False)
    assert control.returncode == 0, control.stderr[-3000:]
    control_weights, _ = _final(tmp_path / 'control')
    # the demo's RandomCrop draws differently after a plain resume
    assert _differences(weights, control_weights)

    # workers draw the crops from their own generators: not exact, and said
    workers = _run(tmp_path / 'workers', resume=True, num_workers=2)
    assert workers.returncode == 0, workers.stderr[-3000:]
    assert ('RNGStateHook: the resumed run will not repeat the '
            'uninterrupted one exactly: train_dataloader.num_workers is 2 '
            'here, 0 when the checkpoint was saved.') in \
        workers.stdout + workers.stderr
    assert 'will not repeat' not in resumed.stdout + resumed.stderr
    workers_weights, _ = _final(tmp_path / 'workers')
    assert _differences(weights, workers_weights)
