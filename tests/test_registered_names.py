"""Every name mmsn (or mmsn_runtime) registers resolves and builds from a
config's ``custom_imports`` alone.

The names are not listed by hand: a fresh interpreter imports every module
of both packages and reads back what they put into MMEngine's registries
(and their children, e.g. mmpretrain's). Then, for each package, another
fresh interpreter does only what a config with
``custom_imports=dict(imports=[PACKAGE])`` does, looks every name up (before
building anything, so that no build can register another name on the side)
and builds each one, checking that it gets the registered class.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ('mmsn', 'mmsn_runtime')

# Arguments to build each registered name with; a name registered without
# an entry here fails test_every_registered_name_has_build_arguments.
NORM = dict(num_features=3)
BUILD_ARGS = {
    **{name: NORM for name in ('SN', 'SN1d', 'SN2d', 'SN3d', 'SyncSN', 'SSN',
                               'SSN1d', 'SSN2d', 'SSN3d', 'SyncSSN',
                               'CollapsedNorm')},
    'PreActResNet': dict(depth=18),
    'ResNetStemPool': dict(depth=18),
    # the loss by its full name: the head is built outside mmpretrain's
    # scope too, where mmpretrain's own heads need the same
    'DropoutLinearClsHead': dict(
        num_classes=3, in_channels=4,
        loss=dict(type='mmpretrain.CrossEntropyLoss')),
    'SklearnDigits': dict(split='val'),
    'ToGrayscale': {},
    'RNGStateHook': {},
    'SNBatchAverageHook': {},
    'SNImportanceLoggerHook': {},
    'SSNRadiusHook': {},
    'GroupClipOptimWrapperConstructor': dict(
        optim_wrapper_cfg=dict(optimizer=dict(type='SGD', lr=0.1))),
}

ROOT_REGISTRIES = '''
from mmengine import registry as _registry
ROOTS = {r.name: r for r in vars(_registry).values()
         if isinstance(r, _registry.Registry) and r.parent is None}
'''

ENUMERATE = ROOT_REGISTRIES + '''
import importlib, json, pkgutil, sys

def walk(registry):
    yield registry
    for child in registry.children.values():
        yield from walk(child)

packages = sys.argv[1:]
for package in packages:
    root_module = importlib.import_module(package)
    for info in pkgutil.walk_packages(root_module.__path__, package + '.'):
        importlib.import_module(info.name)
names = {}
for root in ROOTS.values():
    for registry in walk(root):
        for name, obj in registry.module_dict.items():
            module = getattr(obj, '__module__', '') or ''
            if module.split('.')[0] not in packages:
                continue
            entry = names.setdefault(name, dict(
                registry=root.name, cls=None, builder_in_root=False))
            if isinstance(obj, type):
                entry['cls'] = f'{obj.__module__}.{obj.__qualname__}'
            else:  # a lazy builder of mmsn.registry
                entry['builder_in_root'] = registry is root
print(json.dumps(names))
'''

CHECK = ROOT_REGISTRIES + '''
import json, sys
from mmengine.config import Config
from mmengine.registry import DefaultScope
names, build_args = json.loads(sys.argv[1]), json.loads(sys.argv[2])
Config.fromfile(sys.argv[3])  # imports the config's custom_imports
scope = sys.argv[4]
out = dict(mmpretrain_imported='mmpretrain' in sys.modules, found={}, built={})
with DefaultScope.overwrite_default_scope(scope):
    for name, registry in names.items():  # look up everything first
        with ROOTS[registry].switch_scope_and_registry(scope) as found:
            out['found'][name] = found.get(name) is not None
    for name, registry in names.items():
        obj = ROOTS[registry].build(dict(type=name, **build_args[name]))
        out['built'][name] = (f'{type(obj).__module__}.'
                              f'{type(obj).__qualname__}')
print(json.dumps(out))
'''


def run_python(code, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', code, *args],
                          capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def registered(tmp_path_factory):
    """name -> registry, class and whether mmsn registers a root builder,
    read from the registries after importing every module."""
    cwd = tmp_path_factory.mktemp('enumerate')
    return run_python(ENUMERATE, *PACKAGES, cwd=cwd)


def test_every_registered_name_has_build_arguments(registered):
    # What the packages register, as the README lists it; a new name must
    # be added here and to the build arguments above.
    assert sorted(registered) == sorted(BUILD_ARGS)
    assert all(entry['cls'] for entry in registered.values())


def names_of(registered, package):
    """The names a config importing ``package`` must find: those of its own
    classes, and (mmsn) those it registers a lazy builder for."""
    return {
        name: entry['registry']
        for name, entry in registered.items()
        if entry['cls'].split('.')[0] == package or (
            package == 'mmsn' and entry['builder_in_root'])
    }


@pytest.mark.parametrize('package,scope', [('mmsn', 'mmpretrain'),
                                           ('mmsn', 'mmengine'),
                                           ('mmsn_runtime', 'mmpretrain')])
def test_custom_imports_alone_find_and_build_every_name(
        registered, tmp_path, package, scope):
    names = names_of(registered, package)
    assert names
    config = tmp_path / 'cfg.py'
    config.write_text(
        f'custom_imports = dict(imports=[{package!r}], '
        f'allow_failed_imports=False)\n')
    out = run_python(CHECK, json.dumps(names), json.dumps(BUILD_ARGS),
                     str(config), scope, cwd=tmp_path)
    assert out['mmpretrain_imported'] is (package == 'mmsn_runtime')
    assert out['found'] == {name: True for name in names}
    assert out['built'] == {name: registered[name]['cls'] for name in names}
