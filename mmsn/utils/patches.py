"""How mmsn changes other libraries, and takes the changes back.

``import mmsn`` applies the patches listed by :func:`available_patches`
(the README's patch table lists the same, with the reasons); the modules
that define them (:mod:`mmsn.utils.compat`, :mod:`mmsn.utils.checkpoint`)
are registered by :mod:`mmsn.utils` with :func:`register_patches`. Each one
replaces one function of torch, mmengine or mmcv by a ``functools.wraps``
wrapper that handles SN and otherwise calls the original, and can be taken
back:

* ``MMSN_NO_PATCHES=1`` in the environment before ``import mmsn`` applies
  none; ``MMSN_NO_PATCHES=fuse-conv-bn,checkpoint-loading`` leaves out the
  named ones;
* :func:`remove_patches` restores the originals at run time (all, or the
  named ones), :func:`apply_patches` applies them again.
"""
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

ENV_VAR = 'MMSN_NO_PATCHES'
_MARK = '__mmsn_patch__'


@dataclass(frozen=True)
class Replacement:
    """One attribute replaced by a patch (``original`` is the raw class
    attribute, e.g. the ``classmethod`` object, so it is restored as is)."""
    owner: object
    attr: str
    original: object
    patched: object


@dataclass(frozen=True)
class Patch:
    """A named change to another library.

    Args:
        name (str): Short name, as used by ``MMSN_NO_PATCHES``.
        target (str): The replaced function.
        reason (str): Why SN needs it.
        install (callable): Given the patch's name (it marks the wrappers
            with it), replaces the target and returns the
            :class:`Replacement` records; raises ImportError when the target
            library is not installed (the patch is then not needed).
    """
    name: str
    target: str
    reason: str
    install: Callable[[str], List[Replacement]]


def wraps_as(patch_name: str, original: Callable) -> Callable:
    """``functools.wraps(original)`` that also marks the wrapper as the
    patch ``patch_name`` (so a second copy of mmsn does not wrap twice)."""

    def decorate(wrapper):
        wrapper = functools.wraps(original)(wrapper)
        setattr(wrapper, _MARK, patch_name)
        return wrapper

    return decorate


def _function_of(raw):
    return getattr(raw, '__func__', raw)  # classmethod/staticmethod


def is_patched(raw, patch_name: str) -> bool:
    return getattr(_function_of(raw), _MARK, None) == patch_name


def replace(owner, attr: str, patched) -> Replacement:
    """Set ``owner.attr = patched`` and record what to restore."""
    original = vars(owner)[attr]
    setattr(owner, attr, patched)
    return Replacement(owner, attr, original, patched)


_registered: List[Patch] = []


def register_patches(patches: Iterable[Patch]) -> None:
    """Add patches to those :func:`available_patches` lists, in order (the
    modules that define patches are wired in by :mod:`mmsn.utils`)."""
    known = {p.name for p in _registered}
    for patch in patches:
        if patch.name in known:
            raise ValueError(f'an mmsn patch named {patch.name!r} is '
                             f'registered already')
        known.add(patch.name)
        _registered.append(patch)


def available_patches() -> List[Patch]:
    """The patches mmsn applies, in order."""
    return list(_registered)


_applied: Dict[str, List[Replacement]] = {}


def applied_patches() -> List[str]:
    """Names of the patches this copy of mmsn has applied."""
    return list(_applied)


def _select(names: Optional[Iterable[str]]) -> List[Patch]:
    patches = available_patches()
    if names is None:
        return patches
    names = list(names)
    known = {p.name for p in patches}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f'Unknown mmsn patch(es) {unknown}; the patches '
                         f'are {sorted(known)}')
    return [p for p in patches if p.name in names]


def opted_out() -> List[str]:
    """Names of the patches ``MMSN_NO_PATCHES`` leaves out."""
    value = os.environ.get(ENV_VAR, '').strip()
    if value.lower() in ('', '0', 'false', 'no'):
        return []
    known = [p.name for p in available_patches()]
    if value.lower() in ('1', 'true', 'yes', 'all'):
        return known
    names = [n.strip() for n in value.split(',') if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        warnings.warn(
            f'{ENV_VAR}={value!r} names unknown patch(es) {unknown}; the '
            f'patches are {known} (or 1 for all)',
            stacklevel=2)
    return [n for n in known if n in names]


def apply_patches(names: Optional[Iterable[str]] = None) -> List[str]:
    """Apply mmsn's patches that are not applied yet (idempotent).

    Args:
        names (list[str], optional): The patches to apply. Defaults to all
            except those ``MMSN_NO_PATCHES`` opts out of.

    Returns:
        list[str]: The patches applied by this call.
    """
    skip = set(opted_out()) if names is None else set()
    done = []
    for patch in _select(names):
        if patch.name in _applied or patch.name in skip:
            continue
        try:
            records = patch.install(patch.name)
        except ImportError:  # e.g. mmcv not installed: nothing to patch
            continue
        _applied[patch.name] = records
        done.append(patch.name)
    return done


def remove_patches(names: Optional[Iterable[str]] = None) -> List[str]:
    """Restore the originals that mmsn's patches replaced.

    An attribute that was replaced again by someone else after mmsn is left
    alone, with a warning (restoring it would drop their change).

    Args:
        names (list[str], optional): The patches to remove. Defaults to all.

    Returns:
        list[str]: The patches removed by this call.
    """
    removed = []
    for patch in reversed(_select(names)):
        records = _applied.pop(patch.name, None)
        if records is None:
            continue
        for record in reversed(records):
            if vars(record.owner).get(record.attr) is record.patched:
                setattr(record.owner, record.attr, record.original)
            else:
                warnings.warn(
                    f'mmsn patch {patch.name!r}: {record.attr} of '
                    f'{record.owner!r} was replaced again after mmsn patched '
                    f'it; left as it is',
                    stacklevel=2)
        removed.append(patch.name)
    return removed
