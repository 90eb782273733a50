"""The compiled CPU kernels are checked before they are loaded.

A library cut short (a full disk, an interrupted copy) used to kill every
process with SIGBUS inside ``dlopen``. Now its size and SHA-256 are recorded
when it is built and checked before each load: the cache compiled on first
use is compiled again (or SN falls back to PyTorch's kernels with one
message), and a damaged prebuilt ``mmsn._C`` is not imported. The library is
built in a staging folder and moved into place whole.

The cache tests run SN in fresh processes with a private ``MMSN_CACHE``;
they compile twice (about 40 s each on 2 idle cores).
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mmsn.ops import _extension

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / 'mmsn' / 'ops' / '_extension.py'

# An SN forward in a fresh process, against the paper's equations.
SN_FORWARD = '''
import sys, torch
import mmsn
from mmsn.ops import compiled_kernels_available
from sn_reference import reference_sn
from mmsn.ops import _extension
key = _extension.build_info()
layer = mmsn.SwitchableNorm2d(4)  # loads (here: compiles) the kernels
assert _extension.build_info() == key, 'compiling changed the build key'
x = torch.randn((2, 4, 5, 5), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
    y = layer(x)
want, _ = reference_sn(x.double(), layer.weight.double(),
                       layer.bias.double(), layer.mean_weight.double(),
                       layer.var_weight.double(),
                       (layer.running_mean, layer.running_var))
torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
print('COMPILED' if compiled_kernels_available() else 'FELL BACK')
'''


def run_sn(cache, **env):
    # a copy of the package without a mmsn._C built at install (an editable
    # install has one): the kernels must come from the cache under test
    package = Path(cache) / 'package'
    if not package.exists():
        for name in ('mmsn', 'mmsn_runtime'):
            shutil.copytree(REPO / name, package / name,
                            ignore=shutil.ignore_patterns(
                                '_C*', '__pycache__', '.mim'))
    full_env = dict(os.environ, MMSN_CACHE=str(cache),
                    PYTHONPATH=os.pathsep.join([str(package),
                                                str(REPO / 'tests')]),
                    **env)
    full_env.pop('MMSN_WITH_OPS', None)
    full_env.pop('MMSN_SN_PATH', None)
    # cwd: `python -c` puts it first on sys.path (the checkout's own mmsn)
    proc = subprocess.run([sys.executable, '-W', 'always', '-c', SN_FORWARD],
                          env=full_env, capture_output=True, text=True,
                          timeout=900, cwd=str(cache))
    # a signal (SIGBUS: -7) is what a damaged library used to give
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return proc.stdout.strip(), proc.stderr


@pytest.mark.skipif(os.environ.get('MMSN_WITH_OPS') == '0',
                    reason='MMSN_WITH_OPS=0')
def test_damaged_cached_library_is_compiled_again_or_not_loaded(tmp_path):
    build_dir = Path(_extension.build_directory()).relative_to(
        _extension.cache_root())
    out_dir = tmp_path / build_dir
    # what a killed compile leaves: its staging folder
    (out_dir / 'staging').mkdir(parents=True)
    (out_dir / 'staging' / 'mmsn_C.so').write_bytes(b'half a library')
    out, err = run_sn(tmp_path)
    assert out == 'COMPILED', err
    library = out_dir / 'mmsn_C.so'
    record = json.loads((out_dir / 'built.json').read_text())
    assert record['library'] == _extension.library_record(str(library))
    assert record['library']['size'] == library.stat().st_size > 0
    assert not (out_dir / 'staging').exists()

    # cut to a third: compiled again, with one message naming the cause
    size = library.stat().st_size
    with open(library, 'r+b') as f:
        f.truncate(size // 3)
    out, err = run_sn(tmp_path)
    assert out == 'COMPILED', err
    assert err.count('mmsn: compiling the CPU kernels') == 1, err
    assert f'again ({library} is damaged: it has {size // 3} bytes where ' \
           f'{size} were built' in err, err
    assert library.stat().st_size == size
    out, err = run_sn(tmp_path)             # and then simply loaded
    assert out == 'COMPILED' and 'compiling' not in err, err

    # same size, other bytes; no compiler to repair it: SN falls back to
    # PyTorch's kernels and says why once
    data = bytearray(library.read_bytes())
    data[size // 2:size // 2 + 4096] = bytes(4096)
    library.write_bytes(bytes(data))
    out, err = run_sn(tmp_path, CXX='false')
    assert out == 'FELL BACK', err
    assert err.count('is damaged: its SHA-256 differs from the one recorded '
                     'at build') == 1, err
    assert err.count('RuntimeWarning: mmsn could not compile its CPU '
                     'kernels') == 1, err


def test_a_cache_without_a_library_record_is_not_trusted(tmp_path):
    """A ``built.json`` without size and checksum (older mmsn) means: not
    built; anything else that does not match: damaged, with the reason."""
    library, record = tmp_path / 'mmsn_C.so', tmp_path / 'built.json'
    library.write_bytes(b'\x7fELF' + bytes(100))
    assert _extension._cache_damage(str(library), str(record)) == ''
    record.write_text(json.dumps(_extension.build_info()))
    assert _extension._cache_damage(str(library), str(record)) == ''
    record.write_text(json.dumps(dict(
        _extension.build_info(),
        library=_extension.library_record(str(library)))))
    assert _extension._cache_damage(str(library), str(record)) is None
    record.write_text('{"torch": ')
    assert 'cannot be read' in _extension._cache_damage(
        str(library), str(record))
    record.write_text(json.dumps(dict(library=dict(size=104))))
    assert _extension._cache_damage(str(library), str(record)) == (
        "its build record has no size and checksum: {'size': 104}")


# A Python extension module named _C, as setup.py builds mmsn._C (without
# the kernels: a compile of a few lines instead of 20 s).
TINY_MODULE = r'''
#include <Python.h>
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tiny); }
'''

LOAD_PREBUILT = '''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('_ext', sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
print(ext._load_prebuilt(ext.build_info(), sys.argv[2]))
'''


@pytest.fixture
def prebuilt(tmp_path):
    """A folder with ``_C.<suffix>`` and the ``_C.build.json`` setup.py
    writes for it."""
    package = tmp_path / 'mmsn'
    package.mkdir()
    source = tmp_path / 'tiny.c'
    source.write_text(TINY_MODULE)
    library = package / ('_C' + sysconfig.get_config_var('EXT_SUFFIX'))
    compiler = os.environ.get('CC', 'cc')
    proc = subprocess.run(
        [compiler, '-shared', '-fPIC', '-O0', str(source), '-o', str(library),
         f'-I{sysconfig.get_paths()["include"]}'],
        capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'no C compiler for a tiny module: {proc.stderr[-300:]}')
    _extension.record_prebuilt(str(library))
    return package, library


def load_prebuilt(package):
    proc = subprocess.run(
        [sys.executable, '-c', LOAD_PREBUILT, str(EXTENSION), str(package)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return proc.stdout.strip(), proc.stderr


def test_prebuilt_library_loads_only_as_built(prebuilt):
    package, library = prebuilt
    record = json.loads((package / '_C.build.json').read_text())
    assert record == dict(_extension.build_info(),
                          library=_extension.library_record(str(library)))
    out, err = load_prebuilt(package)
    assert out == str(library) and err == ''

    size = library.stat().st_size
    with open(library, 'r+b') as f:
        f.truncate(size // 3)
    out, err = load_prebuilt(package)
    assert out == 'None'
    assert err == (f'mmsn: not loading {library}: it has {size // 3} bytes '
                   f'where {size} were built; a full disk or an interrupted '
                   f'copy cuts files short. The CPU kernels are compiled on '
                   f'first use instead; reinstall mmsn to repair it\n')


def test_prebuilt_library_without_a_record_of_its_bytes_is_not_loaded(
        prebuilt):
    package, _ = prebuilt
    (package / '_C.build.json').write_text(json.dumps(
        _extension.build_info()))
    assert load_prebuilt(package) == ('None', '')


def test_prebuilt_library_is_loaded_only_into_its_own_torch(prebuilt):
    package, _ = prebuilt
    record = json.loads((package / '_C.build.json').read_text())
    for other in (dict(record, torch='2.0.0'),
                  dict(record, sources='0' * 16)):
        (package / '_C.build.json').write_text(json.dumps(other))
        assert load_prebuilt(package) == ('None', '')
    assert torch.__version__ == record['torch']


IMPORT_C = '''
import importlib, sys
import mmsn
from mmsn.ops import compiled_kernels_available
assert compiled_kernels_available()
module = importlib.import_module('mmsn._C')  # as pkgutil.walk_packages does
print(module.__doc__)
'''


def stale_prebuilt_package(tmp_path) -> Path:
    """A copy of mmsn whose mmsn._C registers the operators but is recorded
    as built for other sources; skips where this process loaded the
    library built at install (no compiled copy to make it from)."""
    from mmsn.ops import backends
    backends.compiled_ops()
    cached = Path(_extension.build_directory()) / (
        _extension.LIBRARY_NAME + '.so')
    if not cached.is_file():
        pytest.skip('this process loaded the library built at install')
    package = tmp_path / 'package'
    for name in ('mmsn', 'mmsn_runtime'):
        shutil.copytree(REPO / name, package / name,
                        ignore=shutil.ignore_patterns('_C*', '__pycache__',
                                                      '.mim'))
    stale = package / 'mmsn' / ('_C' + sysconfig.get_config_var('EXT_SUFFIX'))
    shutil.copyfile(cached, stale)
    _extension.record_prebuilt(str(stale))
    record = json.loads((package / 'mmsn' / '_C.build.json').read_text())
    (package / 'mmsn' / '_C.build.json').write_text(
        json.dumps(dict(record, sources='0' * 16)))
    return package


def run_with_package(package, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(package))
    env.pop('MMSN_SN_PATH', None)
    env.pop('MMSN_WITH_OPS', None)
    return subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))


@pytest.mark.skipif(os.environ.get('MMSN_WITH_OPS') == '0',
                    reason='MMSN_WITH_OPS=0')
def test_importing_a_stale_prebuilt_library_after_compiling_does_not_abort(
        tmp_path):
    """A mmsn._C built at install for other sources (or another torch) is
    not loaded; the kernels compiled on first use are. An `import mmsn._C`
    afterwards must not load the stale file, which would register the
    operators a second time and abort the process."""
    package = stale_prebuilt_package(tmp_path)
    proc = run_with_package(package, IMPORT_C, tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert 'compiled on first use' in proc.stdout


IMPORT_C_FIRST = '''
import importlib
import torch
import mmsn
importlib.import_module('mmsn._C')  # as pkgutil.walk_packages does
from mmsn.ops import compiled_kernels_available
from mmsn.ops._extension import compiled_ops_origin
assert not compiled_kernels_available()
print(compiled_ops_origin())
from mmsn.models.norms import SwitchableNorm2d
x = torch.randn(2, 3, 4, 4) * 3 + 5
layer = SwitchableNorm2d(3)
with torch.no_grad():  # all on BN: per-channel mean and scale
    layer.mean_weight.copy_(torch.tensor([-30., -30., 30.]))
    layer.var_weight.copy_(torch.tensor([-30., -30., 30.]))
y = layer(x)
torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5,
                           rtol=0)
'''


@pytest.mark.skipif(os.environ.get('MMSN_WITH_OPS') == '0',
                    reason='MMSN_WITH_OPS=0')
def test_importing_a_stale_prebuilt_library_first_does_not_abort(tmp_path):
    """The other order: `import mmsn._C` loads the stale library (its
    operators registered) before mmsn chooses its kernels. mmsn then does
    not load the compiled ones over them (a second registration aborts):
    it says why and runs SN on PyTorch's kernels."""
    package = stale_prebuilt_package(tmp_path)
    proc = run_with_package(package, IMPORT_C_FIRST, tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert 'was imported before mmsn chose its kernels' in proc.stdout
    assert 'Reinstall mmsn' in proc.stdout
