"""mmsn's zoo seen from a user's code: model names that mmpretrain's
``get_model`` takes, configs found by name, and a config of the user's own
(outside the checkout) inheriting from mmsn's.

The strong check: an authors'-layout checkpoint (the reference model of
``_authors_resnet.py``, independent of mmsn), converted, loaded by
``mmpretrain.get_model(<mmsn model name>, pretrained=<file>)``, gives the
reference logits.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import mmsn  # noqa: F401
import mmsn.zoo
from _authors_resnet import RefResNet, randomize, save_authors_checkpoint
from mmsn.converters import convert_checkpoint

REPO = Path(__file__).resolve().parents[1]
METAFILE = yaml.safe_load((REPO / 'configs' / 'metafile.yml').read_text())
MODELS = {m['Name']: m for m in METAFILE['Models']}


def _installed_configs():
    """mmsn's configs folder: the checkout's, or mmsn/.mim/configs of an
    install (when the tests run against one); same files either way."""
    root = Path(mmsn.zoo.config_dir())
    assert root in (REPO / 'configs',
                    Path(mmsn.__file__).parent / '.mim' / 'configs')
    return root


def test_config_path_by_file_name_and_by_path():
    configs = _installed_configs()
    for name, path in [
        ('resnet50_sn_8xb32.py', 'resnet50_sn_8xb32.py'),
        ('resnet50_sn_8xb1_batch-study',
         'batch_study/resnet50_sn_8xb1_batch-study.py'),
        ('_base_/models/resnet50_sn.py', '_base_/models/resnet50_sn.py'),
    ]:
        found = mmsn.zoo.config_path(name)
        assert found == str(configs / path)
        assert Path(found).read_text() == (REPO / 'configs' /
                                           path).read_text()
    with pytest.raises(
            FileNotFoundError,
            match=r"mmsn has no config 'resnet50_sn_8xb3' in .*configs; did "
            r"you mean 'resnet50_sn_8xb32.py'"):
        mmsn.zoo.config_path('resnet50_sn_8xb3')
    # a _base_ file is found by its path only (its file name may repeat)
    with pytest.raises(FileNotFoundError):
        mmsn.zoo.config_path('resnet50_sn.py')
    with pytest.raises(TypeError, match='name must be a config name'):
        mmsn.zoo.config_path(None)


def test_model_names_are_the_metafile_models():
    assert mmsn.zoo.model_names() == list(MODELS)
    assert len(MODELS) == 12


def test_register_models_makes_mmpretrain_find_every_zoo_model():
    import mmpretrain
    from mmpretrain.apis import ModelHub
    assert mmsn.zoo.register_models() == list(MODELS)
    assert mmsn.zoo.register_models() == list(MODELS)  # idempotent
    listed = mmpretrain.list_models()
    assert set(MODELS) <= set(listed)
    assert 'resnet50_8xb32_in1k' in listed  # mmpretrain's own are kept
    for name, meta in MODELS.items():
        info = ModelHub.get(name)
        assert Path(info.config.filename) == _installed_configs().parent / \
            meta['Config']
        # no weights to fetch: get_model needs the converted file
        assert info.weights is None


@pytest.mark.parametrize('name', list(MODELS))
def test_get_model_by_name_loads_the_given_checkpoint(name, tmp_path):
    """One build per model: the checkpoint holds two tensors (the stem conv
    and the classifier's bias); get_model must put them into the model of
    the metafile's config."""
    import mmpretrain
    mmsn.zoo.register_models()
    g = torch.Generator().manual_seed(0)
    stem = torch.randn(64, 3, 7, 7, generator=g)
    fc_bias = torch.randn(1000, generator=g)
    path = tmp_path / 'partial.pth'
    torch.save(
        {'state_dict': {'backbone.conv1.weight': stem,
                        'head.fc.bias': fc_bias}}, path)
    model = mmpretrain.get_model(name, pretrained=str(path))
    assert torch.equal(model.backbone.conv1.weight, stem)
    assert torch.equal(model.head.fc.bias, fc_bias)
    backbone = {'v2': 'PreActResNet', 'ssn': 'ResNetStemPool'}
    kind = 'v2' if 'v2_' in name else 'ssn' if '_ssn_' in name else ''
    assert type(model.backbone).__name__ == backbone.get(kind, 'ResNet')
    assert model.backbone.depth == (101 if name.startswith('resnet101')
                                    else 50)


def test_get_model_on_a_converted_authors_checkpoint_gives_its_logits(
        tmp_path):
    import mmpretrain
    mmsn.zoo.register_models()
    ref = randomize(RefResNet(1, 50, True), seed=3).eval()
    src, dst = tmp_path / 'resnetv1sn50.pth.tar', tmp_path / 'r50.pth'
    save_authors_checkpoint(ref, str(src), 'resnetv1sn50')
    convert_checkpoint(str(src), str(dst))
    model = mmpretrain.get_model(
        'resnet50_sn_8xb32_in1k', pretrained=str(dst))
    x = torch.randn((1, 3, 224, 224),
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(x)
        got = model(x, mode='tensor')
    assert expected.std() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5


USER_CONFIG = """\
_base_ = '{{$MMSN_CONFIGS:}}/resnet50_sn_8xb32.py'
model = dict(backbone=dict(depth=18), head=dict(num_classes=7,
                                                in_channels=512))
"""

USER_SCRIPT = """\
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
cfg = Config.fromfile('my_config.py')
with DefaultScope.overwrite_default_scope(cfg.default_scope):
    model = MODELS.build(cfg.model)
sn = model.backbone.layer1[0].sn1
print(type(sn).__name__, model.backbone.depth, model.head.num_classes,
      cfg.optim_wrapper.optimizer.lr, cfg.train_cfg.max_epochs)
"""


def _run_outside(folder, script, **env):
    """``python -c script`` in ``folder``, with mmsn as the tests import
    it (the checkout or an install) and without ``MMSN_CONFIGS`` unless
    given."""
    base = {k: v for k, v in os.environ.items() if k != 'MMSN_CONFIGS'}
    base['PYTHONPATH'] = str(Path(mmsn.__file__).parents[1])
    return subprocess.run([sys.executable, '-c', script], cwd=folder,
                          env=dict(base, **env), capture_output=True,
                          text=True)


def test_user_config_outside_the_checkout_inherits_from_mmsn(tmp_path):
    assert REPO not in tmp_path.parents
    (tmp_path / 'my_config.py').write_text(USER_CONFIG)
    configs = _run_outside(
        tmp_path, 'import mmsn.zoo; print(mmsn.zoo.config_dir())')
    assert configs.returncode == 0, configs.stderr
    done = _run_outside(tmp_path, USER_SCRIPT,
                        MMSN_CONFIGS=configs.stdout.strip())
    assert done.returncode == 0, done.stderr
    # the user's changes and the zoo's recipe (lr 0.1, 120 epochs)
    # (mmengine logs the substitution on stdout first)
    assert done.stdout.splitlines()[-1].split() == [
        'SwitchableNorm2d', '18', '7', '0.1', '120']


def test_unset_variable_is_named(tmp_path):
    (tmp_path / 'my_config.py').write_text(USER_CONFIG)
    done = _run_outside(tmp_path, USER_SCRIPT)
    assert done.returncode != 0
    assert ('`MMSN_CONFIGS` cannot be found in `os.environ`'
            in done.stderr), done.stderr[-2000:]


def test_mmsn_package_prefix_is_not_supported_by_mmengine(tmp_path):
    """The README says why ``_base_ = 'mmsn::...'`` is not the way: mmengine
    resolves ``pkg::`` only for the packages of its fixed table (and only
    for paths with a folder). If a future mmengine resolves it, this fails
    and the README should say so."""
    from mmengine.config import Config
    for base in ('mmsn::resnet50_sn_8xb32.py',
                 'mmsn::_base_/models/resnet50_sn.py'):
        (tmp_path / 'cfg.py').write_text(f'_base_ = {base!r}\n')
        with pytest.raises((AssertionError, ValueError)):
            Config.fromfile(str(tmp_path / 'cfg.py'))
