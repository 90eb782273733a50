"""Helpers for the zoo and tool tests: a tiny ImageNet-style data folder and
config overrides that point a zoo config at it without touching the model.
"""
import os
import os.path as osp
import socket
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'

# What the tests shrink the pipelines to (the configs say 224 / 256).
CROP = 64
RESIZE = 72


def zoo_configs():
    """Configs owned by the zoo: ``configs/*.py`` and the batch study."""
    files = sorted(CONFIGS.glob('*.py')) + sorted(
        (CONFIGS / 'batch_study').glob('*.py'))
    return [str(p.relative_to(REPO)) for p in files]


def make_imagenet_folder(root, num_classes=3, train_per_class=4,
                         val_per_class=2, size=80, seed=0):
    """Write ``root/{train,val}/*.JPEG`` and ``root/meta/{train,val}.txt``.

    The layout mmpretrain's ``ImageNet(data_root=..., split=...)`` reads
    (the annotation-file variant, which does not need 1000 class folders).
    Images of class k are noise around a class colour, so a model can in
    principle tell them apart.
    """
    import cv2
    rng = np.random.default_rng(seed)
    root = Path(root)
    colours = rng.integers(0, 256, size=(num_classes, 3))
    for split, per_class in (('train', train_per_class),
                             ('val', val_per_class)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / 'meta').mkdir(exist_ok=True)
        lines = []
        for k in range(num_classes):
            for i in range(per_class):
                img = colours[k] + rng.normal(0, 40, size=(size, size, 3))
                name = f'{split}_{k}_{i}.JPEG'
                cv2.imwrite(
                    str(root / split / name),
                    np.clip(img, 0, 255).astype(np.uint8))
                lines.append(f'{name} {k}')
        (root / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return str(root)


def _shrink_pipeline(pipeline):
    for t in pipeline:
        if t['type'] == 'RandomResizedCrop':
            t['scale'] = CROP
        elif t['type'] == 'ResizeEdge':
            t['scale'] = RESIZE
        elif t['type'] == 'CenterCrop':
            t['crop_size'] = CROP


def point_at_tiny_data(cfg, data_root, max_batch=2, work_dir=None):
    """Override data root, image size and loader settings, not the model."""
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if loader is None:
            continue
        loader.dataset.data_root = data_root
        _shrink_pipeline(loader.dataset.pipeline)
        loader.batch_size = min(loader.batch_size, max_batch)
        loader.num_workers = 0
        loader.persistent_workers = False
    if work_dir is not None:
        cfg.work_dir = work_dir
    return cfg


def cfg_options_for_tiny_data(data_root, batch=2, crop=CROP, resize=RESIZE):
    """The same overrides as ``--cfg-options`` arguments for the tools."""
    opts = []
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [
            f'{key}.dataset.data_root={data_root}',
            f'{key}.batch_size={batch}',
            f'{key}.num_workers=0',
            f'{key}.persistent_workers=False',
        ]
    opts += [
        f'train_dataloader.dataset.pipeline.1.scale={crop}',
        f'val_dataloader.dataset.pipeline.1.scale={resize}',
        f'val_dataloader.dataset.pipeline.2.crop_size={crop}',
        f'test_dataloader.dataset.pipeline.1.scale={resize}',
        f'test_dataloader.dataset.pipeline.2.crop_size={crop}',
    ]
    return opts


def free_port():
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env(**extra):
    """Environment for tool subprocesses: CPU only, few threads, repo first.
    """
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES='',
        OMP_NUM_THREADS='1',
        MKL_NUM_THREADS='1',
        PYTHONUNBUFFERED='1',
        MASTER_ADDR='127.0.0.1',
        PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), env.get('PYTHONPATH')) if p))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def venv_bin():
    """Directory of the running interpreter (torchrun lives next to it)."""
    import sys
    return osp.dirname(sys.executable)


def _register_record_hook():
    """``RecordTrainStartHook``: what a (resumed) run starts from.

    Imported into the tool subprocesses through ``custom_imports``; rank 0
    saves the iteration, epoch and optimizer state that ``before_train``
    sees, i.e. after ``--resume`` has loaded the checkpoint.
    """
    import torch
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    class RecordTrainStartHook(Hook):

        def __init__(self, out_file):
            self.out_file = out_file

        def before_train(self, runner):
            if runner.rank == 0:
                torch.save(
                    dict(
                        iter=runner.iter,
                        epoch=runner.epoch,
                        optimizer=runner.optim_wrapper.state_dict()),
                    self.out_file)

    HOOKS.register_module(module=RecordTrainStartHook, force=True)


try:
    _register_record_hook()
except ImportError:  # pragma: no cover - mmengine is a test requirement
    pass
