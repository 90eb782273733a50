"""What ``import mmsn`` changes outside mmsn, and how to take it back.

Fresh interpreters (subprocesses) check the state right after the import;
the in-process tests check that every patch wraps its original and that
``remove_patches`` / ``apply_patches`` restore and re-apply them.
"""
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mmsn
from mmsn.utils import patches as patching

REPO = Path(__file__).resolve().parents[1]


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter; return what it prints as JSON."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    full_env.pop(patching.ENV_VAR, None)
    full_env.update(env)
    proc = subprocess.run([sys.executable, '-c', code],
                          capture_output=True,
                          text=True,
                          env=full_env,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_leaves_weights_only_allowlist_alone(tmp_path):
    """An unrelated ``torch.load(weights_only=True)`` of a numpy array is
    refused before and after ``import mmsn``; mmengine's own checkpoints
    load through mmengine, and the allowlist is empty again afterwards."""
    numpy_file = tmp_path / 'array.pth'
    torch.save({'a': np.arange(3)}, numpy_file)
    code = f'''
import json, pickle, sys, torch
def refused(path):
    try:
        torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return True
    return False
# what torch and mmengine themselves allow when they are imported
import mmcv.cnn, mmengine.model, mmengine.optim, mmengine.runner
allowed = set(map(str, torch.serialization.get_safe_globals()))
out = dict(before=refused({str(numpy_file)!r}))
import mmsn
out['after'] = refused({str(numpy_file)!r})
out['globals_added_by_import'] = sorted(
    set(map(str, torch.serialization.get_safe_globals())) - allowed)
out['mmpretrain_imported'] = 'mmpretrain' in sys.modules

from mmengine.logging import MessageHub
from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint
hub = MessageHub.get_instance('t')
hub.update_scalar('train/loss', 1.5)
model = torch.nn.Linear(2, 2)
path = {str(tmp_path / 'c.pth')!r}
save_checkpoint(dict(state_dict=model.state_dict(),
                     message_hub=hub.state_dict()), path)
out['mmengine_raw_refused'] = refused(path)
ckpt = load_checkpoint(model, path)
out['mmengine_loaded'] = 'message_hub' in ckpt
out['globals_added_by_load'] = sorted(
    set(map(str, torch.serialization.get_safe_globals())) - allowed)
print(json.dumps(out))
'''
    out = run_python(code)
    assert out == dict(
        before=True,
        after=True,
        globals_added_by_import=[],
        mmpretrain_imported=False,
        mmengine_raw_refused=True,
        mmengine_loaded=True,
        globals_added_by_load=[])


def test_checkpoint_context_keeps_globals_allowed_before():
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmsn.utils import mmengine_checkpoint_globals
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([HistoryBuffer])
    try:
        with mmengine_checkpoint_globals():
            assert HistoryBuffer in torch.serialization.get_safe_globals()
        # the user's own allowlisting survives the context
        assert HistoryBuffer in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _current(record):
    return vars(record.owner)[record.attr]


def _function(raw):
    return getattr(raw, '__func__', raw)


def test_every_patch_wraps_its_original():
    assert patching.applied_patches() == [
        p.name for p in patching.available_patches()
    ]
    for name, records in patching._applied.items():
        assert records, name
        for record in records:
            patched = _function(_current(record))
            original = _function(record.original)
            assert patched is _function(record.patched)
            assert patched.__wrapped__ is original
            assert patched.__name__ == original.__name__
            assert patched.__doc__ == original.__doc__
            assert not hasattr(original, '__wrapped__'), 'wrapped twice'


def _sn_behaviour():
    """(sync conversion gives SyncSN, fuse_conv_bn refuses SN)."""
    from mmcv.cnn import fuse_conv_bn
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(
        mmsn.SwitchableNorm2d(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), mmsn.SwitchableNorm2d(4))
    try:
        fuse_conv_bn(model)
        refused = False
    except TypeError:
        refused = True
    return type(converted).__name__, refused


def test_remove_and_apply_again():
    originals = {
        name: [(r.owner, r.attr, r.original) for r in records]
        for name, records in patching._applied.items()
    }
    assert _sn_behaviour() == ('SyncSwitchableNorm', True)
    try:
        assert patching.remove_patches() == [
            p.name for p in reversed(patching.available_patches())
        ]
        assert patching.applied_patches() == []
        for records in originals.values():
            for owner, attr, original in records:
                assert vars(owner)[attr] is original
        # The originals treat SN as plain BN again.
        assert _sn_behaviour() == ('SyncBatchNorm', False)
        assert patching.remove_patches() == []
    finally:
        applied = patching.apply_patches()
    assert applied == [p.name for p in patching.available_patches()]
    assert _sn_behaviour() == ('SyncSwitchableNorm', True)
    # idempotent: nothing is wrapped twice
    assert patching.apply_patches() == []
    test_every_patch_wraps_its_original()


def test_remove_some_by_name():
    try:
        assert patching.remove_patches(['fuse-conv-bn']) == ['fuse-conv-bn']
        assert _sn_behaviour() == ('SyncSwitchableNorm', False)
    finally:
        patching.apply_patches(['fuse-conv-bn'])
    assert _sn_behaviour() == ('SyncSwitchableNorm', True)
    with pytest.raises(ValueError, match=r"Unknown mmsn patch\(es\) \['x'\]"):
        patching.remove_patches(['x'])


def test_remove_leaves_a_later_replacement_alone():
    import importlib
    module = importlib.import_module('mmcv.cnn.utils.fuse_conv_bn')
    ours = module._fuse_conv_bn

    def theirs(conv, bn):
        return ours(conv, bn)

    module._fuse_conv_bn = theirs
    try:
        with pytest.warns(UserWarning, match='replaced again after mmsn'):
            patching.remove_patches(['fuse-conv-bn'])
        assert module._fuse_conv_bn is theirs
    finally:
        module._fuse_conv_bn = ours
        patching._applied['fuse-conv-bn'] = [
            patching.Replacement(module, '_fuse_conv_bn', ours.__wrapped__,
                                 ours)
        ]


OPT_OUT = '''
import json, torch, mmsn
from mmengine.registry import MODELS
from mmsn.utils import applied_patches
print(json.dumps(dict(
    applied=applied_patches(),
    torch_sync_wrapped=hasattr(
        torch.nn.SyncBatchNorm.convert_sync_batchnorm, '__wrapped__'),
    sn_registered=MODELS.get('SN') is mmsn.SwitchableNorm2d)))
'''


@pytest.mark.parametrize('value,expected', [
    ('1', []),
    ('all', []),
    ('0', [
        'sync-conversion-torch', 'sync-conversion-mmengine', 'fuse-conv-bn',
        'optim-importance-decay', 'checkpoint-loading'
    ]),
    ('fuse-conv-bn, checkpoint-loading', [
        'sync-conversion-torch', 'sync-conversion-mmengine',
        'optim-importance-decay'
    ]),
])
def test_environment_variable_opts_out(value, expected):
    out = run_python(OPT_OUT, MMSN_NO_PATCHES=value)
    assert out['applied'] == expected
    assert out['torch_sync_wrapped'] is ('sync-conversion-torch' in expected)
    assert out['sn_registered']


def test_environment_variable_with_unknown_name_warns(monkeypatch):
    monkeypatch.setenv(patching.ENV_VAR, 'fuse-conv-bn,sync')
    with pytest.warns(UserWarning, match=r"unknown patch\(es\) \['sync'\]"):
        assert patching.opted_out() == ['fuse-conv-bn']


def test_readme_table_lists_every_patch():
    readme = (REPO / 'README.md').read_text()
    section = re.split(r'\n##+ ',
                       readme.split('### What importing mmsn changes')[1])[0]
    rows = [line for line in section.splitlines() if line.startswith('| `')]
    names = [re.match(r'\| `([^`]+)`', row).group(1) for row in rows]
    assert names == [p.name for p in patching.available_patches()]
    for patch, row in zip(patching.available_patches(), rows):
        assert f'`{patch.target.split(" ")[0]}`' in row
    assert patching.ENV_VAR in section and 'remove_patches' in section


def test_the_patch_mechanism_imports_none_of_its_patches():
    """mmsn/utils/patches.py knows no patch (the modules that define them
    import it, not the other way round); registering a name twice fails."""
    import ast
    tree = ast.parse((REPO / 'mmsn' / 'utils' / 'patches.py').read_text())
    imported = [
        alias.name for node in ast.walk(tree)
        if isinstance(node, ast.Import) for alias in node.names
    ] + [
        '.' * node.level + (node.module or '') for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    ]
    assert [m for m in imported
            if m.startswith('.') or m.split('.')[0] == 'mmsn'] == []
    first = patching.available_patches()[0]
    with pytest.raises(ValueError, match=repr(first.name)):
        patching.register_patches([first])
    assert patching.available_patches().count(first) == 1


# -- registration without importing mmpretrain --------------------------------
LAZY = '''
import json, sys, mmsn
from mmengine.registry import MODELS, DATASETS
root_norms = all(MODELS.get(n) is not None
                 for n in ('SN', 'SN1d', 'SN2d', 'SN3d', 'SyncSN'))
before = 'mmpretrain' in sys.modules
from mmengine.registry import init_default_scope
init_default_scope('mmpretrain')
from mmpretrain.registry import MODELS as PRETRAIN
clf = PRETRAIN.build(dict(
    type='ImageClassifier',
    backbone=dict(type='PreActResNet', depth=18, norm_cfg=dict(type='SN')),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='DropoutLinearClsHead', num_classes=3, in_channels=512)))
from mmsn.models.backbones import PreActResNet
from mmsn.models.heads import DropoutLinearClsHead
data = DATASETS.build(dict(type='SklearnDigits', split='val',
                           pipeline=[]))
print(json.dumps(dict(
    root_norms=root_norms, mmpretrain_before=before,
    backbone=type(clf.backbone) is PreActResNet,
    head=type(clf.head) is DropoutLinearClsHead,
    registered=PRETRAIN.get('PreActResNet') is PreActResNet,
    dataset=type(data).__name__, samples=len(data))))
'''


def test_lazy_registration_builds_the_real_classes():
    out = run_python(LAZY)
    assert out == dict(
        root_norms=True,
        mmpretrain_before=False,
        backbone=True,
        head=True,
        registered=True,
        dataset='SklearnDigits',
        samples=359)


def test_custom_imports_config_builds_in_mmpretrain(tmp_path):
    """The configs' route: ``custom_imports`` then mmpretrain's registry."""
    config = tmp_path / 'cfg.py'
    config.write_text(
        "custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)\n"
        "default_scope = 'mmpretrain'\n"
        "model = dict(type='ImageClassifier', backbone=dict(\n"
        "    type='PreActResNet', depth=18, norm_cfg=dict(type='SN')),\n"
        "    neck=dict(type='GlobalAveragePooling'),\n"
        "    head=dict(type='DropoutLinearClsHead', num_classes=3,\n"
        "              in_channels=512))\n")
    code = f'''
import json
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
cfg = Config.fromfile({str(config)!r})
init_default_scope(cfg.default_scope)
model = MODELS.build(cfg.model)
print(json.dumps([type(model.backbone).__name__, type(model.head).__name__,
                  type(model.backbone.norm1).__name__]))
'''
    assert run_python(code) == [
        'PreActResNet', 'DropoutLinearClsHead', 'SwitchableNorm2d'
    ]


# -- a typo in the norm type --------------------------------------------------
SN_HINT = "did you mean 'SN', 'SSN', 'SN1d', 'SN2d', 'SN3d'?"
NORM_TYPOS = [
    # (what is built, the exact error)
    (dict(type='PreActResNet', depth=18, norm_cfg=dict(type='SNN')),
     "norm_cfg: norm type 'SNN' is not registered (scope 'mmpretrain'); " +
     SN_HINT),
    (dict(type='PreActResNet', depth=18, norm_cfg=dict(type='sn')),
     "norm_cfg: norm type 'sn' is not registered (scope 'mmpretrain'); "
     "did you mean 'SN'?"),
    (dict(type='PreActResNet', depth=18, norm_cfg=dict(type='SyncSNN')),
     "norm_cfg: norm type 'SyncSNN' is not registered (scope 'mmpretrain'); "
     "did you mean 'SyncSN', 'SyncSSN', 'SyncBN', 'SSN', 'SSN1d'?"),
]


@pytest.mark.parametrize(
    'cfg,message',
    NORM_TYPOS,
    ids=[c['norm_cfg']['type'] for c, _ in NORM_TYPOS])
def test_norm_type_typo_names_the_registered_norms(cfg, message):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    with pytest.raises(KeyError) as info:
        MODELS.build(cfg)
    assert info.value.args[0] == message


def test_check_norm_cfgs_finds_a_typo_in_a_whole_config():
    from mmengine.registry import init_default_scope
    from mmsn.utils import check_norm_cfgs
    init_default_scope('mmpretrain')
    model = dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=50, norm_cfg=dict(type='SN')),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=2048))
    check_norm_cfgs(model)  # all registered: no error
    model['backbone']['norm_cfg'] = dict(type='SNN')
    with pytest.raises(KeyError) as info:
        check_norm_cfgs(model)
    assert info.value.args[0] == (
        "cfg.backbone.norm_cfg: norm type 'SNN' is not registered (scope "
        "'mmpretrain'); " + SN_HINT)


def test_check_norm_cfgs_names_every_bad_norm_cfg():
    """Not only the first: a config with three typos gets all three, in
    config order, and the registered norm_cfg between them is not named."""
    from mmengine.registry import init_default_scope
    from mmsn.utils import check_norm_cfgs
    init_default_scope('mmpretrain')
    model = dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=50, norm_cfg=dict(type='SNN')),
        neck=[dict(type='A', norm_cfg=dict(type='SN')),
              dict(type='B', norm_cfg=dict(type='sn'))],
        head=dict(type='LinearClsHead', num_classes=3, in_channels=2048,
                  norm_cfg=dict(type='SyncSNN')))
    with pytest.raises(KeyError) as info:
        check_norm_cfgs(model, where='model')
    assert info.value.args[0] == (
        '3 norm_cfg types are not registered:\n'
        "model.backbone.norm_cfg: norm type 'SNN' is not registered (scope "
        "'mmpretrain'); " + SN_HINT + '\n'
        "model.neck[1].norm_cfg: norm type 'sn' is not registered (scope "
        "'mmpretrain'); did you mean 'SN'?\n"
        "model.head.norm_cfg: norm type 'SyncSNN' is not registered (scope "
        "'mmpretrain'); did you mean 'SyncSN', 'SyncSSN', 'SyncBN', 'SSN', "
        "'SSN1d'?")


def test_numpy_array_is_refused_in_this_process_too():
    buffer = io.BytesIO()
    torch.save({'a': np.arange(3)}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)
