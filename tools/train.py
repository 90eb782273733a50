# Copyright (c) OpenMMLab. All rights reserved.
"""Train a model: mmpretrain's ``tools/train.py`` plus CPU-only distributed.

Same arguments as mmpretrain's; the config is a path or the file name of
one of mmsn's configs. On a machine without CUDA, ``--launcher
pytorch|slurm|mpi`` runs the processes with gloo (:mod:`mmsn.utils.dist`).
Also what ``mim train mmsn CONFIG`` runs.
"""
import argparse

from mmengine.config import Config

import mmsn  # noqa: F401  (SN, PreActResNet, safe loading of checkpoints)
from mmsn.utils.tool_setup import (add_runner_args, find_config,
                                   parse_runner_args, run_runner,
                                   set_dataloader_defaults, set_work_dir)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument(
        'config',
        help='train config: a path, or the file name of one of mmsn\'s '
        'configs')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--no-validate',
        action='store_true',
        help='whether not to evaluate the checkpoint during training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='whether to auto scale the learning rate according to the '
        'actual batch size and the original batch size.')
    parser.add_argument(
        '--no-pin-memory',
        action='store_true',
        help='whether to disable the pin_memory option in dataloaders.')
    parser.add_argument(
        '--no-persistent-workers',
        action='store_true',
        help='whether to disable the persistent_workers option in dataloaders.'
    )
    add_runner_args(parser)
    return parse_runner_args(parser, argv)


def merge_args(cfg, args):
    """Merge CLI arguments to config."""
    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    cfg.launcher = args.launcher
    set_work_dir(cfg, args.work_dir, args.config)

    # enable automatic-mixed-precision training
    if args.amp is True:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    # resume training
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    # enable auto scale learning rate
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True

    overrides = {}
    if args.no_pin_memory:
        overrides['pin_memory'] = False
    if args.no_persistent_workers:
        overrides['persistent_workers'] = False
    set_dataloader_defaults(
        cfg, ('train_dataloader', 'val_dataloader', 'test_dataloader'),
        dict(pin_memory=True, persistent_workers=True), overrides)

    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    return cfg


def train(runner) -> None:
    runner.train()  # returns the model: not kept past the process group


def main(argv=None):
    args = parse_args(argv)
    cfg = merge_args(Config.fromfile(find_config(args.config)), args)
    run_runner(cfg, train)


if __name__ == '__main__':
    main()
