"""Name the registered norm layers when a config asks for an unknown one.

mmcv's ``build_norm_layer`` answers a typo such as ``type='SNN'`` with
``KeyError: 'Cannot find None in registry'``. mmsn does not patch it (the
backbones bind ``build_norm_layer`` at their own import, so a patch would
reach only some of them); instead mmsn's backbones check their ``norm_cfg``
first, and :func:`check_norm_cfgs` checks a whole config before a model is
built.
"""
import difflib
from typing import Iterator, List, Mapping, Optional

from torch import nn

_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _registered_norms() -> List[str]:
    """Norm layer names visible from the current default scope."""
    from mmengine.registry import MODELS
    names = []
    with MODELS.switch_scope_and_registry(None) as registry:
        while registry is not None:
            names += [
                name for name, obj in registry.module_dict.items()
                if isinstance(obj, type) and issubclass(obj, _NORM_BASES)
            ]
            registry = registry.parent
    return sorted(set(names))


def suggest_norm_types(name: str, limit: int = 5) -> List[str]:
    """Registered norm names close to ``name``, closest first."""

    def closeness(candidate):
        if candidate.lower() == name.lower():
            return 2.0
        return difflib.SequenceMatcher(None, name, candidate).ratio()

    scored = [(closeness(n), n) for n in _registered_norms()]
    close = sorted((s for s in scored if s[0] >= 0.5),
                   key=lambda s: (-s[0], s[1]))
    return [n for _, n in close[:limit]]


def _unregistered(norm_cfg: Mapping, where: str) -> Optional[str]:
    """Why ``norm_cfg['type']`` cannot be built, naming the close registered
    norms; None if it is registered (or not a name: mmcv reports those)."""
    from mmengine.registry import MODELS
    norm_type = norm_cfg.get('type') if isinstance(norm_cfg, Mapping) \
        else None
    if not isinstance(norm_type, str):
        return None
    with MODELS.switch_scope_and_registry(None) as registry:
        if registry.get(norm_type) is not None:
            return None
        scope = registry.scope
    close = suggest_norm_types(norm_type)
    hint = (f'did you mean {", ".join(repr(n) for n in close)}?'
            if close else f'registered norms: {_registered_norms()}')
    return (f'{where}: norm type {norm_type!r} is not registered (scope '
            f'{scope!r}); {hint}')


def check_norm_cfg(norm_cfg: Mapping, where: str = 'norm_cfg') -> None:
    """Raise a ``KeyError`` naming the close registered norms if
    ``norm_cfg['type']`` is a name that is not registered."""
    problem = _unregistered(norm_cfg, where)
    if problem is not None:
        raise KeyError(problem)


def _unregistered_in(cfg, where: str) -> Iterator[str]:
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            if key == 'norm_cfg':
                problem = _unregistered(value, f'{where}.{key}')
                if problem is not None:
                    yield problem
            else:
                yield from _unregistered_in(value, f'{where}.{key}')
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            yield from _unregistered_in(value, f'{where}[{i}]')


def check_norm_cfgs(cfg, where: str = 'cfg') -> None:
    """:func:`check_norm_cfg` on every ``norm_cfg`` found in a (model)
    config, e.g. ``check_norm_cfgs(Config.fromfile(path).model)``; one
    ``KeyError`` names every unregistered norm type, one per line."""
    problems = list(_unregistered_in(cfg, where))
    if len(problems) == 1:
        raise KeyError(problems[0])
    if problems:
        raise KeyError(f'{len(problems)} norm_cfg types are not '
                       f'registered:\n' + '\n'.join(problems))
