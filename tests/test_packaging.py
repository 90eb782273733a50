"""How mmsn installs and meets the user's environment.

* the version ranges checked at import are the ones declared to pip, and an
  out-of-range or missing dependency fails the import with a message that
  names it;
* the compiled CPU kernels are obtained the same way whatever the install:
  a prebuilt ``mmsn._C`` only for the torch and sources it was built for,
  otherwise compiled on first use into a per-torch cache, once, by one of
  several processes that start together; without a compiler (or when the
  compile fails) one plain reason, remembered instead of retried;
* the wheel carries what OpenMMLab's ``mim`` looks for (configs, tools,
  model index under ``mmsn/.mim``) and the kernel sources;
* the environment report names versions and the SN backend per device.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import mmsn
from mmsn import version as mmsn_version
from mmsn.ops import _extension, compiled_kernels_available

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / 'mmsn' / 'ops' / '_extension.py'


def _requirement_ranges(path):
    ranges = {}
    for line in Path(path).read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        match = re.fullmatch(r'([A-Za-z0-9_-]+)(.*)', line)
        if match:
            ranges[match.group(1)] = match.group(2)
    return ranges


def test_import_check_uses_the_declared_ranges():
    declared = _requirement_ranges(REPO / 'requirements' / 'runtime.txt')
    for name, (low, high) in mmsn_version.TESTED_RANGES.items():
        expected = f'>={low}' + (f',<{high}' if high else '')
        assert declared[name] == expected, name


def test_out_of_range_and_missing_dependencies_fail_the_import(monkeypatch):
    found = {'torch': '2.14.1', 'torchvision': '0.29.1', 'mmengine': '0.9.1',
             'mmpretrain': '1.2.0', 'mmcv': None}
    monkeypatch.setattr(mmsn_version, 'installed_version', found.get)
    with pytest.raises(ImportError) as err:
        mmsn_version.check_dependencies()
    message = str(err.value)
    assert 'mmengine==0.9.1 is installed' in message
    assert 'mmengine>=0.10.5,<1.0.0' in message
    assert 'mmcv is not installed' in message and 'mmcv-lite' in message
    assert 'torch' not in message.replace('torchvision', '')

    found.update(mmengine='1.0.0', mmcv='2.1.0')
    with pytest.raises(ImportError, match=r'mmengine==1\.0\.0'):
        mmsn_version.check_dependencies()
    found.update(mmengine='0.10.5')
    mmsn_version.check_dependencies()   # the floor itself is accepted


def test_readme_names_what_each_extra_installs():
    """The install block's comment on each ``pip install ".[EXTRA]"`` names
    every package that requirements/EXTRA.txt adds."""
    readme = (REPO / 'README.md').read_text()
    block = readme.split('## Install into your own environment')[1]
    block = block.split('```bash\n')[1].split('```')[0]
    said = {}
    extra = None
    for line in block.splitlines():
        match = re.match(r'pip install "\.\[(\w+)\]"\s*#(.*)', line)
        if match:
            extra = match.group(1)
            said[extra] = match.group(2)
        elif extra and line.lstrip().startswith('#'):
            said[extra] += line
        else:
            extra = None
    assert sorted(said) == ['demo', 'downstream', 'tests']
    for extra, text in said.items():
        names = _requirement_ranges(REPO / 'requirements' / f'{extra}.txt')
        missing = [
            n for n in names
            if not re.search(rf'(?<![\w-]){re.escape(n)}(?![\w-])', text,
                             re.IGNORECASE)
        ]
        assert missing == [], f'[{extra}]: {missing}'


def test_downstream_extra_declares_the_mmcv_range_the_check_names():
    declared = _requirement_ranges(REPO / 'requirements' / 'downstream.txt')
    low, high = mmsn_version.DOWNSTREAM_MMCV_RANGE
    assert declared['mmcv'] == f'>={low},<{high}'


def test_mmdet_refusing_mmcv_fails_the_import_with_the_fix(monkeypatch):
    """The issue's stack: mmcv-lite 2.2 and then "mmsn[downstream]"
    installed mmdet; mmpretrain would fail in mmdet's own assertion."""
    found = {'torch': '2.14.1', 'torchvision': '0.29.1', 'mmengine': '0.10.5',
             'mmpretrain': '1.2.0', 'mmcv': '2.2.0', 'mmdet': '3.3.0'}
    monkeypatch.setattr(mmsn_version, 'installed_version', found.get)
    with pytest.raises(ImportError) as err:
        mmsn_version.check_dependencies()
    message = str(err.value)
    assert ('mmdet==3.3.0 is installed and refuses mmcv==2.2.0 at its import '
            '(it needs full mmcv>=2.0.0rc4,<2.2.0); mmpretrain imports '
            'mmdet, so classification fails too. Either `pip uninstall mmdet '
            'mmsegmentation`') in message
    assert 'tested with' not in message   # 2.2.0 is in mmpretrain's range

    # within mmdet's range; and an mmcv just below it (1.x is out of mmsn's
    # own range, reported as such, not as mmdet's)
    found.update(mmcv='2.1.0')
    mmsn_version.check_dependencies()
    found.update(mmcv='2.0.0rc3')
    with pytest.raises(ImportError, match=r'mmdet==3\.3\.0 is installed'):
        mmsn_version.check_dependencies()


def test_mmseg_refusing_mmcv_warns_only(monkeypatch):
    """mmpretrain does not import mmseg: classification still works."""
    found = {'torch': '2.14.1', 'torchvision': '0.29.1', 'mmengine': '0.10.5',
             'mmpretrain': '1.2.0', 'mmcv': '2.2.0', 'mmseg': '1.2.2'}
    monkeypatch.setattr(mmsn_version, 'installed_version', found.get)
    with pytest.warns(UserWarning) as record:
        mmsn_version.check_dependencies()
    assert [str(w.message) for w in record] == [
        'mmsegmentation==1.2.2 is installed and refuses mmcv==2.2.0 at its '
        'import (it needs full mmcv>=2.0.0rc4,<2.2.0): mmseg fails to '
        'import. Either `pip uninstall mmsegmentation` or replace mmcv by '
        'full mmcv 2.1.0 (README, "SN as a detection / segmentation '
        'backbone", builds full mmcv 2.1.0).'
    ]


def test_running_environment_is_in_range():
    mmsn_version.check_dependencies()


# -- compiled kernels --------------------------------------------------------
# Subprocesses load mmsn/ops/_extension.py on its own (as setup.py does),
# without importing mmsn, and go straight to the first-use compilation (a
# checkout may hold a prebuilt mmsn._C), so the kernels they load or
# compile never meet the ones this process already registered.
LOAD_KERNELS = f'''
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location('_ext', {str(EXTENSION)!r})
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
reason = ext._load_or_compile(ext.build_info())
if reason is not None:
    print('REASON', reason)
    sys.exit(3)
x = torch.randn(2, 3, 50, dtype=torch.float64) * 3 + 7
mean, var = torch.ops.mmsn.instance_moments(x, 1)
ref_var, ref_mean = torch.var_mean(x, dim=2, correction=1)
assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-12)
assert torch.allclose(var, ref_var, rtol=1e-12, atol=0)
print('LOADED', ext.build_directory())
'''


def _run_loader(cache, **env):
    full_env = dict(os.environ, MMSN_CACHE=str(cache), **env)
    full_env.pop('MMSN_WITH_OPS', None)
    return subprocess.Popen([sys.executable, '-c', LOAD_KERNELS],
                            env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.skipif(os.environ.get('MMSN_WITH_OPS') == '0',
                    reason='MMSN_WITH_OPS=0')
def test_first_use_compiles_once_for_processes_starting_together(tmp_path):
    """Two processes (like two ranks) with an empty cache: one compiles,
    the other waits for it; both get working kernels; a third loads the
    cached library without compiling."""
    procs = [_run_loader(tmp_path) for _ in range(2)]
    results = [_finish(p) for p in procs]
    for code, out, err in results:
        assert code == 0, out + err
        assert 'LOADED' in out
    messages = ''.join(err for _, _, err in results)
    assert messages.count('mmsn: compiling the CPU kernels') == 1, messages
    assert 'compiled in' in messages

    build_dirs = [d for d in (tmp_path / 'ext').iterdir() if d.is_dir()]
    assert len(build_dirs) == 1
    info = json.loads((build_dirs[0] / 'built.json').read_text())
    assert info['torch'] == torch.__version__

    code, out, err = _finish(_run_loader(tmp_path))
    assert code == 0 and 'LOADED' in out, out + err
    assert 'compiling' not in err


def test_without_a_compiler_one_plain_reason_and_no_cache(tmp_path):
    code, out, err = _finish(
        _run_loader(tmp_path, CXX=str(tmp_path / 'no-such-compiler')))
    assert code == 3
    assert 'no C++ compiler' in out
    assert 'same results, slower' in out
    assert 'MMSN_WITH_OPS=0' in out
    assert not (tmp_path / 'ext').exists() or not any(
        (tmp_path / 'ext').iterdir())


def test_a_failed_compile_is_reported_once_not_retried(tmp_path):
    # `false` is a compiler that fails on every input
    code, out, _ = _finish(_run_loader(tmp_path, CXX='false'))
    assert code == 3
    assert 'could not compile' in out and 'build.log' in out
    assert 'Delete' in out          # how to try again
    failed = list((tmp_path / 'ext').glob('*/failed.txt'))
    assert len(failed) == 1
    code, out2, err2 = _finish(_run_loader(tmp_path, CXX='false'))
    assert code == 3 and out2 == out
    assert 'compiling' not in err2   # remembered, not compiled again


def test_prebuilt_library_is_used_only_for_its_own_torch():
    info = _extension.build_info()
    assert _extension._load_prebuilt(dict(info, torch='2.0.0')) is None
    assert _extension._load_prebuilt(dict(info, sources='0' * 16)) is None


# -- what the wheel carries --------------------------------------------------
@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """A wheel of this checkout, built as pip builds one (without the
    prebuilt kernels: MMSN_WITH_OPS=0 at build time, as under isolation)."""
    if importlib.util.find_spec('wheel') is None and importlib.util.find_spec(
            'setuptools.command.bdist_wheel') is None:
        pytest.skip('building a wheel needs the wheel package')
    out = tmp_path_factory.mktemp('dist')
    build = tmp_path_factory.mktemp('build')
    subprocess.run([
        sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
        '--no-build-isolation', '-w', str(out), str(REPO)
    ], check=True, env=dict(os.environ, MMSN_WITH_OPS='0', TMPDIR=str(build)),
                   capture_output=True)
    return zipfile.ZipFile(next(out.glob('mmsn-*.whl')))


def test_wheel_ships_what_mim_and_first_use_compilation_need(wheel):
    names = set(wheel.namelist())
    for config in REPO.glob('configs/**/*.py'):
        assert f'mmsn/.mim/{config.relative_to(REPO)}' in names
    for tool in ('train.py', 'test.py', 'dist_train.sh',
                 'model_converters/sn_to_mmpretrain.py',
                 'analysis/plot_importance.py'):
        assert f'mmsn/.mim/tools/{tool}' in names
    assert 'mmsn/.mim/model-index.yml' in names
    assert 'mmsn/.mim/configs/metafile.yml' in names
    for source in REPO.glob('mmsn/ops/csrc/*.cpp'):
        assert f'mmsn/ops/csrc/{source.name}' in names
    # scripts that set up a checkout are not package tools
    assert 'mmsn/.mim/tools/setup_env.sh' not in names
    assert not any('__pycache__' in n for n in names)


def test_wheel_declares_ranges_and_extras(wheel):
    metadata = next(n for n in wheel.namelist() if n.endswith('METADATA'))
    text = wheel.read(metadata).decode()
    requires = re.findall(r'^Requires-Dist: (.*)$', text, re.M)
    pins = [r for r in requires if re.search(r'==\s*[\d]', r)]
    assert pins == [], 'exact pins replace a user\'s packages'
    assert 'mmengine<1.0.0,>=0.10.5' in requires
    for extra in ('demo', 'tests', 'downstream'):
        assert f'Provides-Extra: {extra}' in text
    assert 'scikit-learn; extra == "demo"' in requires
    assert 'mmcv<2.2.0,>=2.0.0rc4; extra == "downstream"' in requires


def test_model_index_points_at_existing_configs():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    for imported in index['Import']:
        meta = yaml.safe_load((REPO / imported).read_text())
        for model in meta['Models']:
            assert (REPO / model['Config']).is_file(), model['Name']


def test_config_file_names_are_unique_for_mim():
    """`mim train mmsn NAME.py` finds the config by file name anywhere in
    the package and refuses a name found twice."""
    configs = [p for p in REPO.glob('configs/**/*.py')
               if '_base_' not in p.parts]
    names = [p.name for p in configs]
    assert len(names) == len(set(names)), sorted(
        n for n in names if names.count(n) > 1)


def test_no_sys_path_tricks_in_package_or_tools():
    offenders = [
        str(p.relative_to(REPO))
        for p in list(REPO.glob('mmsn/**/*.py')) + list(
            REPO.glob('tools/**/*.py'))
        if re.search(r'sys\.path\.(insert|append)', p.read_text())
    ]
    assert offenders == []


# -- environment report ------------------------------------------------------
def test_collect_env_reports_versions_and_backends():
    out = subprocess.run(
        [sys.executable, '-m', 'mmsn.utils.collect_env'],
        capture_output=True, text=True, check=True).stdout
    report = dict(
        line.split(': ', 1) for line in out.splitlines() if ': ' in line)
    assert report['PyTorch'] == torch.__version__
    assert report['MMSN'].startswith(mmsn.__version__)
    expected = 'compiled' if compiled_kernels_available() else 'native'
    assert report['MMSN SN backend (cpu)'].startswith(expected + ':')
    assert 'MMPreTrain' in report and 'MMEngine' in report

    off = subprocess.run(
        [sys.executable, '-m', 'mmsn.utils.collect_env'],
        env=dict(os.environ, MMSN_WITH_OPS='0'),
        capture_output=True, text=True, check=True).stdout
    assert 'MMSN SN backend (cpu): native:' in off
    assert 'MMSN_WITH_OPS: 0' in off
