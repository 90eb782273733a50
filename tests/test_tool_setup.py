"""What mmsn's tools share (mmsn/utils/tool_setup.py): configs by path or by
name, the work directory and dataloader defaults, and the train and test
tools run on a config given by name from outside the checkout."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from mmsn.utils.tool_setup import (config_root, find_config,
                                   set_dataloader_defaults, set_work_dir)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / 'configs' / 'demo' / 'resnet_sn_digits.py'


def load_tool(relative):
    path = REPO / 'tools' / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_by_path_or_by_file_name(tmp_path, monkeypatch):
    assert Path(config_root()).resolve() == (REPO / 'configs').resolve()
    # a path is taken as it is, even where a config of that name exists
    own = tmp_path / 'resnet50_sn_8xb32.py'
    own.write_text('x = 1\n')
    assert find_config(str(own)) == str(own)
    monkeypatch.chdir(tmp_path)
    assert find_config('resnet50_sn_8xb32.py') == 'resnet50_sn_8xb32.py'
    # elsewhere the name (with or without .py, or under a folder that does
    # not exist here) finds mmsn's config, as `mim train` does
    monkeypatch.chdir(tmp_path / '..')
    for name in ('resnet_sn_digits.py', 'resnet_sn_digits',
                 'configs/demo/resnet_sn_digits.py'):
        assert Path(find_config(name)).resolve() == DEMO.resolve(), name


def test_unknown_or_ambiguous_config_names_say_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        find_config('resnet_sn_digit.py')
    assert str(err.value) == (
        f"'resnet_sn_digit.py' is neither a file nor the name of a config "
        f"among mmsn's configs in {config_root()}; did you mean "
        f"resnet_sn_digits.py, resnet_ssn_digits.py, resnet50_sn.py?")
    # two _base_ files share this name
    with pytest.raises(FileNotFoundError) as err:
        find_config('resnet50_sn.py')
    assert str(err.value) == (
        "'resnet50_sn.py' is not a file, and several of mmsn's configs are "
        "named resnet50_sn.py: _base_/batch_study/resnet50_sn.py, "
        "_base_/models/resnet50_sn.py; give the path of one")


def test_work_dir_from_the_command_line_the_config_or_its_name():
    cfg = Config(dict(work_dir='from_config'))
    set_work_dir(cfg, 'from_cli', 'a/b/cfg_name.py')
    assert cfg.work_dir == 'from_cli'
    cfg = Config(dict(work_dir='from_config'))
    set_work_dir(cfg, None, 'a/b/cfg_name.py')
    assert cfg.work_dir == 'from_config'
    cfg = Config(dict())
    set_work_dir(cfg, None, 'a/b/cfg_name.py')
    assert cfg.work_dir == os.path.join('./work_dirs', 'cfg_name')


def test_dataloader_defaults_fill_in_and_overrides_win():
    cfg = Config(dict(
        train_dataloader=dict(batch_size=3, pin_memory=False),
        val_dataloader=dict(batch_size=5, persistent_workers=False),
        test_dataloader=None))
    set_dataloader_defaults(
        cfg, ('train_dataloader', 'val_dataloader', 'test_dataloader'),
        dict(pin_memory=True, persistent_workers=True),
        dict(persistent_workers=False))
    assert cfg.train_dataloader.to_dict() == dict(
        batch_size=3, pin_memory=False, persistent_workers=False,
        collate_fn=dict(type='default_collate'))
    assert cfg.val_dataloader.to_dict() == dict(
        batch_size=5, pin_memory=True, persistent_workers=False,
        collate_fn=dict(type='default_collate'))
    assert cfg.test_dataloader is None


def test_train_tool_merges_its_arguments():
    train = load_tool('train.py')
    args = train.parse_args([
        'resnet_sn_digits.py', '--no-pin-memory', '--amp', '--resume',
        'x.pth', '--no-validate', '--cfg-options', 'train_cfg.max_epochs=3'
    ])
    cfg = train.merge_args(Config.fromfile(find_config(args.config)), args)
    assert cfg.work_dir == os.path.join('./work_dirs', 'resnet_sn_digits')
    assert (cfg.resume, cfg.load_from) == (True, 'x.pth')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.val_dataloader is None and cfg.train_cfg.max_epochs == 3
    assert cfg.train_dataloader.pin_memory is False
    assert cfg.train_dataloader.collate_fn == dict(type='default_collate')


def test_train_and_test_tools_take_a_config_name(tmp_path):
    """From a folder outside the checkout, as ``mim run`` passes names."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    env.pop('LOCAL_RANK', None)
    fast = ['--cfg-options', 'train_cfg.max_epochs=1',
            'custom_hooks.1.num_samples=64']
    train = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'),
         'resnet_sn_digits.py', *fast],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    work_dir = tmp_path / 'work_dirs' / 'resnet_sn_digits'
    assert (work_dir / 'epoch_1.pth').is_file()
    test = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'test.py'), 'resnet_sn_digits',
         str(work_dir / 'epoch_1.pth'), '--out', 'metrics.json',
         '--out-item', 'metrics'],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert test.returncode == 0, test.stderr[-3000:]
    metrics = (tmp_path / 'metrics.json').read_text()
    top1 = float(re.search(r'"accuracy/top1": ([0-9.]+)', metrics).group(1))
    assert 0 <= top1 <= 100
