"""The config of a collapsed model: the source config with every SN/SSN
``norm_cfg`` replaced by ``CollapsedNorm`` and mmsn's other types replaced
or dropped, so that it loads with ``mmsn_runtime`` instead of ``mmsn``."""
import copy
import importlib
from typing import Dict, List, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope

from mmsn.models.norms.switchable_norm import _SwitchableNorm
from .collapse import CollapseError

# mmsn types with a plain equivalent at inference: type -> (new type, keys
# to drop). Dropout is a no-op in eval mode.
PLAIN_EQUIVALENTS = {
    'DropoutLinearClsHead': ('LinearClsHead', ('dropout_rate', )),
}
RUNTIME_PACKAGE = 'mmsn_runtime'
# Modules whose import registers the rest of mmsn's types in mmpretrain's
# registries (``import mmsn`` registers the norms and hooks, and for some
# of these only builders that import them on first use, others not at
# all), so that every type a config uses is recognised as mmsn's.
REGISTERING_MODULES = ('mmsn.models.backbones', 'mmsn.models.heads',
                       'mmsn.datasets', 'mmsn.engine')


def _registries():
    for module in REGISTERING_MODULES:
        importlib.import_module(module)
    from mmpretrain import registry
    return dict(
        model=registry.MODELS,
        dataset=registry.DATASETS,
        transform=registry.TRANSFORMS,
        hook=registry.HOOKS,
        metric=registry.METRICS,
        optimizer_constructor=registry.OPTIM_WRAPPER_CONSTRUCTORS)


def _lookup(type_name, scope):
    """(kind, class) of a type name in mmpretrain's scope, or (None, None).
    """
    if not isinstance(type_name, str):
        return None, None
    with DefaultScope.overwrite_default_scope(scope):
        for kind, registry in _registries().items():
            cls = registry.get(type_name)
            if cls is not None:
                return kind, cls
    return None, None


def _from_mmsn(cls) -> bool:
    return getattr(cls, '__module__', '').split('.')[0] == 'mmsn'


def _rewrite(node, scope, path, mmsn_types, found_norms):
    """Rewrite dicts in place; collect mmsn types still needed as
    (path, type, kind)."""
    if isinstance(node, dict):
        type_name = node.get('type')
        kind, cls = _lookup(type_name, scope)
        if isinstance(cls, type) and issubclass(cls, _SwitchableNorm):
            found_norms.append(path)
            eps = node.get('eps', 1e-5)
            unbiased = node.get('unbiased', True)
            node.clear()
            node.update(type='CollapsedNorm', eps=eps, unbiased=unbiased)
            return
        if type_name in PLAIN_EQUIVALENTS and _from_mmsn(cls):
            new_type, dropped = PLAIN_EQUIVALENTS[type_name]
            node['type'] = new_type
            for key in dropped:
                node.pop(key, None)
        elif cls is not None and _from_mmsn(cls):
            mmsn_types.append((path, type_name, kind))
        for key, value in node.items():
            _rewrite(value, scope, f'{path}.{key}', mmsn_types, found_norms)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _rewrite(value, scope, f'{path}[{i}]', mmsn_types, found_norms)


def collapsed_config(cfg: Config) -> Tuple[Config, Dict[str, List[str]]]:
    """The config of the collapsed model and a report.

    Training-only mmsn parts (custom hooks, the optimizer constructor) are
    dropped; ``custom_imports`` names ``mmsn_runtime`` instead of ``mmsn``.
    If the model itself still needs an mmsn type with no plain equivalent
    (e.g. ``PreActResNet``), ``mmsn`` stays imported: the fallback.

    Returns:
        tuple: (config, report) where report has ``norms`` (config paths of
        the replaced ``norm_cfg``), ``model_needs_mmsn`` and
        ``others_need_mmsn`` (every mmsn type left, once per type with the
        config paths that use it, e.g. ``'ToGrayscale (transform, at
        test_pipeline[0], ...)'``).

    Raises:
        CollapseError: The config has no SN/SSN ``norm_cfg``.
    """
    data = copy.deepcopy(cfg.to_dict())
    scope = data.get('default_scope', 'mmpretrain')
    hooks = data.get('custom_hooks') or []
    data['custom_hooks'] = [
        h for h in hooks if not _from_mmsn(_lookup(h.get('type'), scope)[1])
    ]
    optim = data.get('optim_wrapper')
    if isinstance(optim, dict) and _from_mmsn(
            _lookup(optim.get('constructor'), scope)[1]):
        optim.pop('constructor')

    model_types, other_types, norms = [], [], []
    _rewrite(data['model'], scope, 'model', model_types, norms)
    for key, value in data.items():
        if key != 'model':
            _rewrite(value, scope, key, other_types, norms)
    if not norms:
        raise CollapseError(
            f'{cfg.filename or "The config"} has no SN or SSN layer to '
            f'collapse (no norm_cfg of a Switchable Normalization type)')

    imports = list((data.get('custom_imports') or {}).get('imports', []))
    imports = [i for i in imports if i.split('.')[0] != 'mmsn']
    imports.insert(0, RUNTIME_PACKAGE)
    if model_types:
        imports.append('mmsn')  # fallback: the model needs it
    data['custom_imports'] = dict(
        imports=imports, allow_failed_imports=False)
    return Config(ConfigDict(data)), dict(
        norms=norms, model_needs_mmsn=_by_type(model_types),
        others_need_mmsn=_by_type(other_types))


def _by_type(found: List[Tuple[str, str, str]]) -> List[str]:
    """``'Type (kind, at path, path)'`` per type, in order of appearance.
    """
    paths: Dict[Tuple[str, str], List[str]] = {}
    for path, type_name, kind in found:
        paths.setdefault((type_name, kind), []).append(path)
    return [
        f'{type_name} ({kind}, at {", ".join(where)})'
        for (type_name, kind), where in paths.items()
    ]
