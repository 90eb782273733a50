"""Every public class and function shows its real arguments and defaults.

Public means: listed in the ``__all__`` of ``mmsn``, ``mmsn_runtime`` or one
of their subpackages and modules. ``help()`` and IDEs show a constructor's
or function's signature; ``*args`` / ``**kwargs`` hide the arguments behind
them, and a sentinel default shows as ``<object object at 0x...>``.
Exceptions and typing aliases are not called with arguments of their own
and are left out.
"""
import importlib
import inspect
import pkgutil
import re

import pytest

import mmsn
import mmsn_runtime

# The norm layers are being rewritten (mmsn/models/norms/, by the lead);
# their signatures are fixed there. Remove an entry once its check passes
# (strict: an unexpected pass fails, so the list cannot go stale).
NORM_LAYERS = {
    'mmsn.SwitchableNorm1d', 'mmsn.SwitchableNorm2d', 'mmsn.SwitchableNorm3d',
    'mmsn.SyncSwitchableNorm', 'mmsn.SparseSwitchableNorm1d',
    'mmsn.SparseSwitchableNorm2d', 'mmsn.SparseSwitchableNorm3d',
    'mmsn.SyncSparseSwitchableNorm'
}
_SENTINEL = re.compile(r'<[\w.]+ object at 0x[0-9a-f]+>')


def _public_api():
    """``(module.name, object)`` for each public class and function, under
    the first (shortest) module that exports it."""
    modules = []
    for package in (mmsn, mmsn_runtime):
        modules.append(package.__name__)
        modules += [
            info.name for info in pkgutil.walk_packages(
                package.__path__, package.__name__ + '.')
        ]
    found = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if (err.name or '').split('.')[0] in ('mmsn', 'mmsn_runtime'):
                raise
            continue  # needs an optional dependency (e.g. triton)
        for name in getattr(module, '__all__', ()):
            obj = getattr(module, name)
            is_api = inspect.isfunction(obj) or (
                inspect.isclass(obj)
                and not issubclass(obj, BaseException))
            qualname = f'{module_name}.{name}'
            if is_api and len(found.get(id(obj), (qualname, ))[0]) >= len(
                    qualname):
                found[id(obj)] = (qualname, obj)
    return sorted(found.values(), key=lambda item: item[0])


PUBLIC_API = _public_api()


def _cases():
    for qualname, obj in PUBLIC_API:
        yield pytest.param(obj, id=qualname)


def test_the_walk_finds_the_api():
    names = {qualname for qualname, _ in PUBLIC_API}
    assert {'mmsn.convert_switchable_norm', 'mmsn.SwitchableNorm2d',
            'mmsn.datasets.SklearnDigits', 'mmsn.zoo.register_models',
            'mmsn.models.backbones.PreActResNet',
            'mmsn_runtime.ResNetStemPool'} <= names
    assert NORM_LAYERS <= names


@pytest.mark.parametrize('obj', list(_cases()))
def test_signature_shows_the_real_arguments(obj):
    signature = inspect.signature(obj)
    hidden = [
        str(p) for p in signature.parameters.values()
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    sentinels = [
        f'{p.name}={p.default!r}' for p in signature.parameters.values()
        if p.default is not p.empty and _SENTINEL.fullmatch(repr(p.default))
    ]
    assert not hidden and not sentinels, (
        f'{obj.__module__}.{obj.__qualname__}{signature}: arguments hidden '
        f'behind {hidden}, sentinel defaults {sentinels}')


@pytest.mark.parametrize('subclass,parents,own', [
    ('mmsn_runtime.ResNetStemPool', ['mmpretrain.models.backbones.ResNet'],
     {'stem_pool'}),
    ('mmsn.models.heads.DropoutLinearClsHead', [
        'mmpretrain.models.heads.LinearClsHead',
        'mmpretrain.models.heads.ClsHead'
    ], {'dropout_rate'}),
    ('mmsn.datasets.SklearnDigits', [], {
        'split', 'val_ratio', 'seed', 'pipeline', 'test_mode', 'indices',
        'serialize_data', 'lazy_init', 'max_refetch'
    }),
])
def test_spelled_out_arguments_keep_the_parents_defaults(
        subclass, parents, own):
    """Classes that list their parents' arguments (instead of ``**kwargs``)
    take all of them, with the parents' defaults (the first parent's where
    two have one); ``own`` are the arguments of the class itself."""

    def load(path):
        module, name = path.rsplit('.', 1)
        return getattr(importlib.import_module(module), name)

    mine = inspect.signature(load(subclass)).parameters
    theirs = {}
    for parent in parents:
        for name, p in inspect.signature(load(parent)).parameters.items():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                theirs.setdefault(name, p)
    assert set(theirs) <= set(mine)
    for name, p in theirs.items():
        assert mine[name].default == p.default, name
    assert set(mine) - set(theirs) == own


def test_sklearn_digits_passes_its_base_arguments():
    """The arguments SklearnDigits spells out reach BaseDataset."""
    pytest.importorskip('sklearn')
    from mmsn.datasets import SklearnDigits
    data = SklearnDigits('train', indices=5, serialize_data=False,
                         lazy_init=True, max_refetch=3)
    assert not data._fully_initialized and data.max_refetch == 3
    assert len(data) == 5 and not data.serialize_data
    assert not data.test_mode and SklearnDigits('val').test_mode
    assert SklearnDigits('val', test_mode=False).test_mode is False


@pytest.mark.parametrize('name,momentum,extra', [
    ('SwitchableNorm1d', 0.003, ()), ('SwitchableNorm2d', 0.1, ()),
    ('SwitchableNorm3d', 0.003, ()),
    ('SyncSwitchableNorm', 0.1, ('process_group', )),
    ('SparseSwitchableNorm1d', 0.003, ()),
    ('SparseSwitchableNorm2d', 0.003, ()),
    ('SparseSwitchableNorm3d', 0.003, ()),
    ('SyncSparseSwitchableNorm', 0.003, ('process_group', )),
])
def test_norm_layers_show_their_own_defaults(name, momentum, extra):
    """help() shows each layer's own default momentum (the arity decides it)
    and the arguments it really takes, and the instance has them."""
    cls = getattr(mmsn, name)
    params = inspect.signature(cls).parameters
    assert params['momentum'].default == momentum
    assert list(params)[:9] == [
        'num_features', 'eps', 'momentum', 'affine', 'using_bn',
        'moving_average', 'unbiased', 'last_gamma', 'requires_grad']
    assert [p for p in params if p not in (
        'num_features', 'eps', 'momentum', 'affine', 'using_bn',
        'moving_average', 'unbiased', 'last_gamma', 'requires_grad',
        'device', 'dtype')] == list(extra)
    assert cls(4).momentum == momentum
