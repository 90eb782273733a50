"""mmsn's version and the versions of its dependencies it was tested with.

``check_dependencies()`` runs first in ``import mmsn`` (as mmpretrain checks
mmcv), so an incompatible stack fails with a message that names the package
and the range, instead of an obscure error later. The ranges equal
``requirements/runtime.txt`` (a test keeps them in step).
"""
from typing import Dict, Optional, Tuple

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


def check_dependencies() -> None:
    """Raise ImportError naming every dependency outside its tested range."""
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
    if problems:
        raise ImportError('mmsn cannot run in this environment:\n  ' +
                          '\n  '.join(problems) +
                          '\n(README, "Requirements", lists what was tested.)')
