"""mmsn's version and the versions of its dependencies it was tested with.

``check_dependencies()`` runs first in ``import mmsn`` (as mmpretrain checks
mmcv), so an incompatible stack fails with a message that names the package
and the range, instead of an obscure error later. The ranges equal
``requirements/runtime.txt`` (a test keeps them in step). It also names an
installed mmdet or mmsegmentation that refuses the installed mmcv.
"""
import warnings
from typing import Dict, List, Optional, Tuple

__version__ = '0.1.0'

# package -> (lowest tested, first excluded or None): [low, high)
TESTED_RANGES: Dict[str, Tuple[str, Optional[str]]] = {
    'torch': ('2.7', None),
    'torchvision': ('0.22', None),
    'mmengine': ('0.10.5', '1.0.0'),
    'mmpretrain': ('1.2.0', '2.0.0'),
}
# mmcv ships as mmcv-lite or mmcv (full); mmpretrain 1.2 accepts this range
MMCV_RANGE = ('2.0.0', '2.4.0')
# mmdet 3.3 and mmsegmentation 1.2 assert this mmcv range at their import
# (and need full mmcv's compiled ops); "mmsn[downstream]" declares it
# (requirements/downstream.txt, kept in step by a test).
DOWNSTREAM_MMCV_RANGE = ('2.0.0rc4', '2.2.0')
# module -> (distribution, whether mmpretrain imports it). mmpretrain
# imports an installed mmdet, so mmdet refusing mmcv breaks classification
# too (an error); mmseg refusing it breaks only mmseg (a warning).
DOWNSTREAM = {'mmdet': ('mmdet', True), 'mmseg': ('mmsegmentation', False)}
DOWNSTREAM_README = ('README, "SN as a detection / segmentation backbone", '
                     'builds full mmcv 2.1.0')


# module -> the distributions that may provide it
DISTRIBUTIONS = {
    'mmcv': ('mmcv', 'mmcv-lite', 'mmcv-full'),
    'mmseg': ('mmsegmentation', ),
}


def installed_version(module: str) -> Optional[str]:
    """Version of an importable module without importing it (mmpretrain's
    import is slow and registers models), or None if it is not there."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec
    if find_spec(module) is None:
        return None
    dists = DISTRIBUTIONS.get(module, (module, ))
    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    # importable without metadata (a source checkout on PYTHONPATH)
    return getattr(__import__(module), '__version__', None)


def _range_text(name: str, low: str, high: Optional[str]) -> str:
    return f'{name}>={low}' + (f',<{high}' if high else '')


def _downstream_mismatches(mmcv_version: str) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for an installed mmdet/mmseg that refuses
    ``mmcv_version`` at its import."""
    from mmengine.utils import digit_version
    low, high = DOWNSTREAM_MMCV_RANGE
    if digit_version(low) <= digit_version(mmcv_version) < digit_version(
            high):
        return [], []
    wanted = _range_text('mmcv', low, high)
    errors, warns = [], []
    for module, (dist, imported_by_mmpretrain) in DOWNSTREAM.items():
        found = installed_version(module)
        if found is None:
            continue
        message = (f'{dist}=={found} is installed and refuses '
                   f'mmcv=={mmcv_version} at its import (it needs full '
                   f'{wanted})')
        if imported_by_mmpretrain:
            errors.append(
                f'{message}; mmpretrain imports {dist}, so classification '
                f'fails too. Either `pip uninstall mmdet mmsegmentation` '
                f'(classification only) or replace mmcv by full mmcv 2.1.0 '
                f'({DOWNSTREAM_README})')
        else:
            warns.append(
                f'{message}: {module} fails to import. Either `pip '
                f'uninstall {dist}` or replace mmcv by full mmcv 2.1.0 '
                f'({DOWNSTREAM_README}).')
    return errors, warns


def check_dependencies() -> None:
    """Raise ImportError naming every dependency outside its tested range,
    and an mmdet that refuses the installed mmcv (warn for mmseg)."""
    ranges = dict(TESTED_RANGES, mmcv=MMCV_RANGE)
    problems = []
    found = {name: installed_version(name) for name in ranges}
    if found['mmengine'] is not None:
        from mmengine.utils import digit_version
    for name, (low, high) in ranges.items():
        wanted = _range_text(name, low, high)
        if found[name] is None:
            hint = (' (mmcv-lite for classification, full mmcv for '
                    'mmdet/mmseg)' if name == 'mmcv' else '')
            problems.append(f'{name} is not installed; install {wanted}'
                            f'{hint}')
        elif found['mmengine'] is None:
            continue        # digit_version is mmengine's
        elif digit_version(found[name]) < digit_version(low) or (
                high is not None
                and digit_version(found[name]) >= digit_version(high)):
            problems.append(f'{name}=={found[name]} is installed, but mmsn '
                            f'{__version__} was tested with {wanted}')
    if found['mmengine'] is not None and found['mmcv'] is not None:
        errors, warns = _downstream_mismatches(found['mmcv'])
        problems += errors
        for message in warns:
            warnings.warn(message, stacklevel=2)
    if problems:
        raise ImportError('mmsn cannot run in this environment:\n  ' +
                          '\n  '.join(problems) +
                          '\n(README, "Requirements", lists what was tested.)')
