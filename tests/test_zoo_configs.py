"""Every zoo config states the authors' recipe and trains for one iteration.

The recipe table below is written from the reference (the SN model zoo and
the paper's batch-size study); the configs must agree with it, and every
config on disk must be in it.
"""
import functools
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS, init_default_scope
from mmengine.runner import Runner

import mmsn  # noqa: F401
from mmpretrain.registry import MODELS
from mmsn.models.norms.switchable_norm import _SwitchableNorm

from _zoo_data import (CONFIGS, REPO, make_imagenet_folder,
                        point_at_tiny_data, zoo_configs)

# name: (backbone, depth, norm, per-GPU batch, GPUs, lr, epochs, schedule,
#        using_bn, zero_init_residual a.k.a. last_gamma)
ZOO = {
    # last_gamma in every v1 row, cosine ones included (the authors'
    # resnetv1sn50/101 cosine configs set it); not in the v2 rows.
    'resnet50_sn_8xb32': ('ResNet', 50, 'SN', 32, 8, 0.1, 120, 'cos', True,
                          True),
    'resnet101_sn_8xb32': ('ResNet', 101, 'SN', 32, 8, 0.1, 120, 'cos',
                           True, True),
    'resnet50v2_sn_8xb32': ('PreActResNet', 50, 'SN', 32, 8, 0.1, 120, 'cos',
                            True, False),
    'resnet101v2_sn_8xb32': ('PreActResNet', 101, 'SN', 32, 8, 0.1, 120,
                             'cos', True, False),
    'resnet50_sn_8xb32_step': ('ResNet', 50, 'SN', 32, 8, 0.1, 100, 'step',
                               True, True),
    'resnet50_sn_8xb4': ('ResNet', 50, 'SN', 4, 8, 0.0125, 100, 'step', True,
                         True),
    'resnet50_sn_8xb1': ('ResNet', 50, 'SN', 1, 8, 0.003125, 100, 'step',
                         False, True),
}
# ResNet50v1+SSN under the step recipe at (8,32) ... (8,2)
for _b in (32, 16, 8, 4, 2):
    ZOO[f'resnet50_ssn_8xb{_b}'] = ('ResNetStemPool', 50, 'SSN', _b, 8,
                                    0.1 * 8 * _b / 256, 100, 'step', True,
                                    True)
STUDY_CELLS = [(8, 32), (8, 16), (8, 8), (8, 4), (8, 2), (1, 16), (1, 32),
               (8, 1), (1, 8)]
for _norm in ('BN', 'GN', 'SN'):
    for _g, _b in STUDY_CELLS:
        _name = f'resnet50_{_norm.lower()}_{_g}xb{_b}_batch-study'
        ZOO[f'batch_study/{_name}'] = (
            'ResNet', 50, _norm, _b, _g, 0.1 * _g * _b / 256, 100, 'step',
            not (_norm == 'SN' and _b == 1), True)

# Published top-1 / top-5 of the zoo (reference table).
PUBLISHED = {
    'resnet101v2_sn_8xb32': (78.81, 94.16),
    'resnet101_sn_8xb32': (78.54, 94.10),
    'resnet50v2_sn_8xb32': (77.57, 93.65),
    'resnet50_sn_8xb32': (77.49, 93.32),
    'resnet50_sn_8xb32_step': (76.92, 93.26),
    'resnet50_sn_8xb4': (75.85, 92.70),
    'resnet50_sn_8xb1': (75.94, 92.70),
    # SSN: the SSN authors' README (its (8,4) top-5 as printed there)
    'resnet50_ssn_8xb32': (77.25, 93.29),
    'resnet50_ssn_8xb16': (76.98, 93.29),
    'resnet50_ssn_8xb8': (76.75, 93.33),
    'resnet50_ssn_8xb4': (76.07, 96.71),
    'resnet50_ssn_8xb2': (75.85, 92.73),
}

SN_CODE = 'https://github.com/switchablenorms/Switchable-Normalization'
SSN_CODE = 'https://github.com/switchablenorms/Sparse_SwitchNorm'
# The authors' downloads: (Google Drive file id, Baidu Pan share). SN rows
# from the reference (shared/reference/switchable-norm.md), SSN rows from
# the SSN authors' README.
DOWNLOADS = {
    'resnet101v2_sn_8xb32': ('1z-F1nc7T-cdEM-HtYDALW0pJGPX0-RkS',
                             '1rK-ukAjEIPql2ECi38hRbQ'),
    'resnet101_sn_8xb32': ('1xza5ju6lRRelPym3Sj99VY_8c4jXhxkn',
                           '1CCM0zZITQOzkXd__pWERZw'),
    'resnet50v2_sn_8xb32': ('1CjLURwDkynhiXoKjYxUyEIOnWDPVmPnL',
                            '1XdN4tQcvTTIZjyNrnQpQXw'),
    'resnet50_sn_8xb32': ('17mHmoVom2zM7nrbFeE4yzKa7KtqykTyD',
                          '1jx3Bj15hgfEBZYhi5HP0kQ'),
    'resnet50_sn_8xb32_step': ('1lOTzjgX6B9J9gkm8JdxaWGBKC1T9VLsl',
                               '1pLdnZYxynpztEnc1eUzVvA'),
    'resnet50_sn_8xb4': ('1x_ZR0ZFtvRzZHkFZVXeVoLeXoJKX-LrZ',
                         '1qdzaB9r6DffTm_DXTG7MAw'),
    'resnet50_sn_8xb1': ('1-y8dDn19Hx02efy4Z5ZRihggYHTYvqkc',
                         '10JmkrQ2WWEeWzqNfB0Fytg'),
    'resnet50_ssn_8xb32': ('1b7tezVjfSl1MZNHRC8qkaw59lLW4EYEh',
                           '1pjhl57-uhcGj1o-S77SGHw'),
    'resnet50_ssn_8xb16': ('1wJx_6bNrv7N9zdy1m2vkABTwMuowluxV',
                           '1CPLelAIKkRS65yRWqVc-_Q'),
    'resnet50_ssn_8xb8': ('18HXLmZVB5JF_TcneEMHXtCo1RQt17fYC',
                          '1xur_fRDKNIUCLrw8g1N4kg'),
    'resnet50_ssn_8xb4': ('1Ry4kjLURixg2_pzj6J1lwGg1USnSC0oz',
                          '1hA55h7IHoPovQmhwtDLR4A'),
    'resnet50_ssn_8xb2': ('1r485fLeSAwS5zKrxcAtGxa_mPr1lWcoS',
                          '1lzdmVtVGTjWIymdYve6X_A'),
}


def _key(path):
    return str(Path(path).relative_to('configs').with_suffix(''))


@functools.lru_cache(maxsize=None)
def _cfg_text(path):
    return Config.fromfile(str(REPO / path)).dump()


def _load_cfg(path):
    # Parsing a config with mmpretrain:: bases takes ~1 s; parse once.
    return Config.fromstring(_cfg_text(path), '.py')


def _published_params():
    meta = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())
    return {
        Path(m['Config']).stem: m['Metadata']['Parameters']
        for m in meta['Models']
    }


def test_every_config_has_a_recipe():
    assert sorted(_key(p) for p in zoo_configs()) == sorted(ZOO)
    assert len(ZOO) == 7 + 5 + 27


@pytest.mark.parametrize('path', zoo_configs(), ids=_key)
def test_recipe(path):
    (backbone, depth, norm, batch, gpus, lr, epochs, schedule, using_bn,
     zero_init) = ZOO[_key(path)]
    cfg = _load_cfg(path)
    assert 'mmsn' in cfg.custom_imports.imports
    assert cfg.default_scope == 'mmpretrain'

    # Model: backbone, norm, last_gamma, dropout 0.5 before fc.
    bb = cfg.model.backbone
    assert (bb.type, bb.depth, bb.norm_cfg.type) == (backbone, depth, norm)
    assert bb.norm_cfg.get('using_bn', True) is using_bn
    if norm == 'GN':
        assert bb.norm_cfg.num_groups == 32
    assert bb.zero_init_residual is zero_init
    assert cfg.model.head.type == 'DropoutLinearClsHead'
    assert cfg.model.head.dropout_rate == 0.5
    assert cfg.model.head.num_classes == 1000

    # Batch and lr: lr is 0.1 per 256 images, for the config's total batch.
    assert cfg.train_dataloader.batch_size == batch
    assert cfg.auto_scale_lr.base_batch_size == batch * gpus
    assert math.isclose(cfg.optim_wrapper.optimizer.lr, lr)
    assert math.isclose(lr, 0.1 * batch * gpus / 256)
    # The GPU count and per-GPU batch are in the name, as OpenMMLab does.
    assert re.search(rf'_{gpus}xb{batch}(_|$)', _key(path))

    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.momentum, opt.weight_decay) == ('SGD', 0.9, 1e-4)
    if norm == 'SSN':
        # SSN's recipe: importance parameters at lr x0.1, no weight decay,
        # gradient clipped to norm 1; the radius schedule; the authors'
        # stem pooling and momentum.
        assert cfg.optim_wrapper.constructor == \
            'GroupClipOptimWrapperConstructor'
        keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
        for name in ('.mean_weight', '.var_weight'):
            assert keys[name] == dict(lr_mult=0.1, decay_mult=0.0,
                                      max_grad_norm=1.0)
        assert [h.type for h in cfg.custom_hooks] == ['SSNRadiusHook']
        assert bb.stem_pool == dict(kernel_size=3, stride=2, padding=0,
                                    ceil_mode=True)
        assert 'momentum' not in bb.norm_cfg  # SSN's default 0.003
    else:
        # Weight decay on every parameter (importance weights included).
        assert 'paramwise_cfg' not in cfg.optim_wrapper

    # Schedule.
    assert cfg.train_cfg.by_epoch and cfg.train_cfg.max_epochs == epochs
    sched = cfg.param_scheduler
    if schedule == 'cos':
        warmup, cosine = sched
        # From (practically) 0; exactly 0 divides by zero in mmengine.
        assert warmup.type == 'LinearLR' and 0 < warmup.start_factor <= 1e-6
        assert (warmup.begin, warmup.end) == (0, 5)
        assert cosine.type == 'CosineAnnealingLR'
        assert (cosine.begin, cosine.end, cosine.T_max) == (5, 120, 115)
        assert cosine.eta_min == 0
        assert warmup.convert_to_iter_based and cosine.convert_to_iter_based
    else:
        assert sched.type == 'MultiStepLR'
        assert sched.milestones == [30, 60, 90] and sched.gamma == 0.1

    # Augmentation: RandomResizedCrop 224 + flip + PCA lighting; test
    # resize 256 + centre crop 224; ImageNet mean/std.
    train = cfg.train_dataloader.dataset.pipeline
    assert [t.type for t in train] == [
        'LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'Lighting',
        'PackInputs'
    ]
    assert train[1].scale == 224
    assert train[2].prob == 0.5 and train[2].direction == 'horizontal'
    assert train[3].alphastd == 0.1 and len(train[3].eigval) == 3
    for key in ('val_dataloader', 'test_dataloader'):
        test = cfg[key].dataset.pipeline
        assert [t.type for t in test] == [
            'LoadImageFromFile', 'ResizeEdge', 'CenterCrop', 'PackInputs'
        ]
        assert (test[1].scale, test[1].edge) == (256, 'short')
        assert test[2].crop_size == 224
    assert cfg.data_preprocessor.mean == [123.675, 116.28, 103.53]
    assert cfg.data_preprocessor.std == [58.395, 57.12, 57.375]
    assert cfg.val_evaluator.topk == (1, 5)


def _last_and_other_norms(backbone):
    """(the last norm of every residual block, all other norms)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
    last = []
    for module in backbone.modules():
        if hasattr(module, 'downsample') and hasattr(module, 'norm2'):
            last.append(
                module.norm3 if hasattr(module, 'norm3') else module.norm2)
    last_ids = {id(m) for m in last}
    others = [
        m for m in backbone.modules()
        if isinstance(m, norm_types) and id(m) not in last_ids
    ]
    return last, others


@pytest.fixture(scope='module')
def tiny_imagenet(tmp_path_factory):
    # A quiet current logger: init_weights otherwise logs every parameter.
    MMLogger.get_instance('test_zoo_configs', log_level='WARNING')
    return make_imagenet_folder(tmp_path_factory.mktemp('imagenet'))


@pytest.mark.parametrize('path', zoo_configs(), ids=_key)
def test_one_train_iteration(path, tiny_imagenet):
    norm, using_bn = ZOO[_key(path)][2], ZOO[_key(path)][8]
    cfg = point_at_tiny_data(_load_cfg(path), tiny_imagenet)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()

    params = _published_params().get(_key(path))
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    sns = [m for m in model.modules() if isinstance(m, _SwitchableNorm)]
    if norm in ('SN', 'SSN'):
        assert sns and all(m.using_bn is using_bn for m in sns)
        assert all(
            m.mean_weight.numel() == (3 if using_bn else 2) for m in sns)
    else:
        assert not sns

    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    # The schedulers as the Runner builds them (iteration-based warmup and
    # cosine need the epoch length).
    schedulers = [
        PARAM_SCHEDULERS.build(
            s, default_args=dict(
                optimizer=optim_wrapper, epoch_length=len(loader)))
        for s in (cfg.param_scheduler if isinstance(
            cfg.param_scheduler, list) else [cfg.param_scheduler])
    ]
    batch = next(iter(loader))
    assert batch['inputs'][0].shape[-2:] == (64, 64)
    fc_before = model.head.fc.weight.detach().clone()
    # last_gamma: the last norm of each block starts at gamma 0 (and beta
    # 0); every other norm, the shortcut's included, at gamma 1.
    last, others = _last_and_other_norms(model.backbone)
    assert len(last) == sum(model.backbone.stage_blocks)
    zero_init = ZOO[_key(path)][9]
    for norm in last:
        assert torch.all(norm.weight == (0. if zero_init else 1.))
        assert torch.all(norm.bias == 0)
    assert len(others) > 2 * len(last)
    for norm in others:
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)

    # The optimizer clears the gradients after its step: record them.
    importance_grads = {}
    gamma_is_zero = {}
    for i, m in enumerate(sns):
        gamma_is_zero[i] = bool((m.weight == 0).all())
        m.mean_weight.register_hook(
            functools.partial(importance_grads.__setitem__, i))
    model.train()
    log_vars = model.train_step(batch, optim_wrapper)
    assert torch.isfinite(log_vars['loss'])
    assert not torch.equal(model.head.fc.weight, fc_before)
    # The importance weights are trained too, except where last_gamma
    # zeroed gamma (the output is then beta, whatever the statistics).
    assert len(importance_grads) == len(sns)
    for i, grad in importance_grads.items():
        assert torch.isfinite(grad).all()
        assert (grad.abs().sum() > 0) is not gamma_is_zero[i]

    # Two more iterations of the schedule: the lr follows the recipe.
    lr, schedule = ZOO[_key(path)][5], ZOO[_key(path)][7]
    for _ in range(2):
        for scheduler in schedulers:
            if not scheduler.by_epoch:
                scheduler.step()
    lrs = optim_wrapper.get_lr()['lr']
    if schedule == 'cos':
        # Linear warmup over 5 epochs of len(loader) iterations, from ~0
        # (mmengine reaches the full lr at the last warmup iteration).
        start = cfg.param_scheduler[0].start_factor
        expected = lr * (start + (1 - start) * 2 / (5 * len(loader) - 1))
    else:
        expected = lr
    assert lrs[0] == pytest.approx(expected, rel=1e-4)

    model.eval()
    val_batch = next(iter(Runner.build_dataloader(cfg.val_dataloader)))
    with torch.no_grad():
        preds = model.val_step(val_batch)
    assert len(preds) == len(val_batch['data_samples'])
    assert preds[0].pred_score.shape == (1000, )
    assert torch.isfinite(preds[0].pred_score).all()


def test_readme_and_metafile_list_the_zoo():
    meta = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())
    models = {Path(m['Config']).stem: m for m in meta['Models']}
    assert sorted(models) == sorted(PUBLISHED)
    readme = (CONFIGS / 'README.md').read_text()
    for name, (top1, top5) in PUBLISHED.items():
        (metrics, ) = [
            r['Metrics'] for r in models[name]['Results']
            if r['Dataset'] == 'ImageNet-1k'
        ]
        assert metrics['Top 1 Accuracy'] == pytest.approx(top1)
        if top5 is not None:
            assert metrics['Top 5 Accuracy'] == pytest.approx(top5)
        assert (REPO / models[name]['Config']).is_file()
        assert models[name]['In Collection'] in {
            c['Name']
            for c in meta['Collections']
        }
        assert f'({name}.py)' in readme
        assert f'{top1:.2f}' in readme
    # The batch-study configs are linked from the README too.
    for path in zoo_configs():
        if path.startswith('configs/batch_study/'):
            assert f'(batch_study/{Path(path).name})' in readme


def test_every_zoo_model_links_the_authors_download():
    """Metafile (mmpretrain's `Converted From` fields) and the zoo tables
    of both READMEs: each model's own Google Drive file (and, in
    configs/README.md, its Baidu Pan share on the same row). No top-level
    `Weights`: get_model(pretrained=True) and `mim download` would fetch it
    as an mmpretrain checkpoint, which the authors' files are not."""
    meta = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())
    models = {Path(m['Config']).stem: m for m in meta['Models']}
    assert sorted(models) == sorted(DOWNLOADS)
    zoo_rows = {
        line.split('[config](')[1].split(')')[0][:-3]: line
        for line in (CONFIGS / 'README.md').read_text().splitlines()
        if '[config](' in line and not line.startswith('| [')
    }
    readme = (REPO / 'README.md').read_text()
    for name, (drive_id, baidu) in DOWNLOADS.items():
        model = models[name]
        assert 'Weights' not in model, name
        source = model['Converted From']
        assert drive_id in source['Weights'], name
        assert source['Weights'].startswith('https://drive.google.com/')
        assert source['Code'] == (SSN_CODE if '_ssn_' in name else SN_CODE)
        assert drive_id in zoo_rows[name], name
        assert f'https://pan.baidu.com/s/{baidu}' in zoo_rows[name], name
        assert f'`{model["Name"]}`' in readme, name
        assert drive_id in readme, name
