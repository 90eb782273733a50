"""How mmsn obtains its compiled CPU kernels (the ``torch.ops.mmsn`` ops).

The one place that knows it; the backends only ask :func:`load_compiled_ops`
for the op namespace. In order:

1. ``MMSN_WITH_OPS=0``: none (SN runs on PyTorch's own kernels).
2. ``mmsn._C``, built by ``setup.py`` when torch was importable at build time
   (``pip install --no-build-isolation``, or a wheel built that way), used
   only if ``_C.build.json`` beside it names the running torch, Python and
   kernel sources.
3. Otherwise the sources shipped in ``mmsn/ops/csrc`` are compiled on first
   use with ``torch.utils.cpp_extension`` (about 20 s, once per torch
   version) into ``$MMSN_CACHE/ext/<key>`` (default ``~/.cache/mmsn``) and
   loaded from there afterwards. A file lock lets processes that start
   together (distributed ranks, parallel tests) compile once and share it.

So every way of installing mmsn ends with the same kernels on a machine
with a C++ compiler; without one, the reason says what is missing and
what it costs.
"""
import functools
import glob
import hashlib
import importlib
import json
import logging
import os
import os.path as osp
import platform
import shutil
import sys
import sysconfig
import time
from typing import Dict, List, Optional, Tuple

import torch

CSRC_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
# -fno-math-errno: sqrt inlines (and vectorizes) without an errno path.
# -DNDEBUG: setuptools adds it (from Python's flags), torch's JIT does not.
# setup.py builds mmsn._C with these same flags.
CXX_FLAGS = ['-O3', '-fopenmp', '-fno-math-errno', '-DNDEBUG']
LD_FLAGS = ['-fopenmp']
BUILD_INFO = '_C.build.json'   # written by setup.py next to mmsn._C
LIBRARY_NAME = 'mmsn_C'        # the library compiled on first use

# What the missing kernels cost, for the messages below.
_COST = ('SN on the CPU runs on PyTorch\'s own kernels instead: same '
         'results, slower')
_SILENCE = 'MMSN_WITH_OPS=0 silences this'


def kernel_sources() -> List[str]:
    """The C++ sources of the kernels, in a fixed order."""
    return sorted(glob.glob(osp.join(CSRC_DIR, '*.cpp')))


def build_info() -> Dict[str, str]:
    """What a compiled library must match to be loaded into this process:
    torch (version and C++ ABI), Python, machine, and a digest of the
    sources and flags."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(osp.join(CSRC_DIR, '*'))):
        digest.update(osp.basename(path).encode())
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(CXX_FLAGS + LD_FLAGS).encode())
    return {
        'torch': torch.__version__,
        'cxx11_abi': str(bool(torch._C._GLIBCXX_USE_CXX11_ABI)),
        'python': sys.implementation.cache_tag,
        'machine': platform.machine(),
        'sources': digest.hexdigest()[:16],
    }


def cache_root() -> str:
    """``$MMSN_CACHE``, else ``$XDG_CACHE_HOME/mmsn`` or ``~/.cache/mmsn``
    (shared with tools/build_mmcv.sh's wheel cache)."""
    if os.environ.get('MMSN_CACHE'):
        return os.environ['MMSN_CACHE']
    base = os.environ.get('XDG_CACHE_HOME') or osp.join(
        osp.expanduser('~'), '.cache')
    return osp.join(base, 'mmsn')


def build_directory(info: Optional[Dict[str, str]] = None) -> str:
    info = info or build_info()
    key = '-'.join([f"torch{info['torch']}", info['python'],
                    info['machine'], f"abi{int(info['cxx11_abi'] == 'True')}",
                    info['sources']])
    return osp.join(cache_root(), 'ext', key)


def load_compiled_ops() -> Tuple[Optional[object], Optional[str]]:
    """``(torch.ops.mmsn, None)`` when the kernels load, else
    ``(None, reason)``, the reason being a full sentence for the user.

    Computed once per process; the first call may compile (see the module
    docstring)."""
    ops, reason, _ = _load()
    return ops, reason


def compiled_ops_origin() -> str:
    """Where the loaded kernels come from (or why there are none), for the
    environment report."""
    ops, reason, origin = _load()
    return origin if ops is not None else reason


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[object], Optional[str], str]:
    if os.environ.get('MMSN_WITH_OPS') == '0':
        return None, 'MMSN_WITH_OPS=0 turned the compiled kernels off', ''
    info = build_info()
    prebuilt = _load_prebuilt(info)
    if prebuilt:
        return torch.ops.mmsn, None, f'mmsn._C, built at install ({prebuilt})'
    reason = _load_or_compile(info)
    if reason is not None:
        return None, reason, ''
    return (torch.ops.mmsn, None,
            f'compiled on first use, cached in {build_directory(info)}')


def _load_prebuilt(info: Dict[str, str]) -> Optional[str]:
    """Import ``mmsn._C`` if setup.py built it for exactly this torch and
    these sources; its path, else None."""
    here = osp.dirname(osp.dirname(osp.abspath(__file__)))   # mmsn/
    try:
        with open(osp.join(here, BUILD_INFO)) as f:
            built_for = json.load(f)
    except (OSError, ValueError):
        return None
    if built_for != info:
        return None     # another torch or changed sources: compile instead
    try:
        module = importlib.import_module('mmsn._C')  # registers the ops
    except ImportError:
        return None
    return module.__file__


def _find_ninja() -> Optional[str]:
    """ninja's folder: on PATH, in this environment's scripts folder (a venv
    that is used without being activated), or the ninja package's."""
    found = shutil.which('ninja')
    if found:
        return osp.dirname(found)
    candidates = [sysconfig.get_path('scripts')]
    try:
        import ninja
        candidates.append(getattr(ninja, 'BIN_DIR', ''))
    except ImportError:
        pass
    for folder in candidates:
        if folder and shutil.which('ninja', path=folder):
            return folder
    return None


def _load_or_compile(info: Dict[str, str]) -> Optional[str]:
    """Load the library cached for ``info``, compiling it first if needed.
    ``None`` on success, else the reason."""
    out_dir = build_directory(info)
    library = osp.join(out_dir, LIBRARY_NAME + '.so')
    done = osp.join(out_dir, 'built.json')
    failed = osp.join(out_dir, 'failed.txt')
    if not osp.exists(done):
        reason = _compile_once(info, out_dir, done, failed)
        if reason is not None:
            return reason
    try:
        torch.ops.load_library(library)
    except OSError as err:
        return (f'mmsn could not load its compiled CPU kernels ({err}); '
                f'{_COST}. Delete {out_dir} to compile them again; '
                f'{_SILENCE}.')
    return None


def _compile_once(info, out_dir, done, failed) -> Optional[str]:
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        return (f'mmsn found no C++ compiler (`{compiler}`; install g++, or '
                f'set CXX) to compile its CPU kernels, so {_COST}. With a '
                f'compiler they compile on first use (about 20 s, once per '
                f'torch version); {_SILENCE}.')
    ninja_dir = _find_ninja()
    if ninja_dir is None:
        return (f'mmsn needs `ninja` (pip install ninja) to compile its CPU '
                f'kernels, so {_COST}; {_SILENCE}.')
    try:
        os.makedirs(out_dir, exist_ok=True)
        from filelock import FileLock, Timeout  # a dependency of torch
        lock = FileLock(out_dir + '.lock')
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _say(f'waiting for another process that is compiling the CPU '
                 f'kernels into {out_dir}')
            lock.acquire()
    except OSError as err:
        return (f'mmsn cannot write its kernel cache ({err}), so {_COST}. '
                f'Point MMSN_CACHE at a writable folder; {_SILENCE}.')
    try:
        if osp.exists(done):            # another process compiled them
            return None
        if osp.exists(failed):          # do not retry at every start
            with open(failed) as f:
                return f.read()
        return _compile(info, out_dir, done, failed, ninja_dir)
    finally:
        lock.release()


def _compile(info, out_dir, done, failed, ninja_dir) -> Optional[str]:
    # Its import warns that a CUDA build of torch finds no CUDA runtime,
    # which does not matter for CPU kernels.
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    # torch < 2.14 marks a build in progress with a plain file that stays
    # behind when the builder is killed; holding our lock, none can be live.
    stale = osp.join(out_dir, 'lock')
    if osp.exists(stale):
        os.remove(stale)
    _say(f'compiling the CPU kernels of Switchable Normalization for torch '
         f"{info['torch']} (once per torch version; about 20 s on 2 idle "
         f'cores) into '
         f'{out_dir}; {_SILENCE}')
    start = time.monotonic()
    path = os.environ.get('PATH', '')
    os.environ['PATH'] = ninja_dir + os.pathsep + path
    try:
        cpp_extension.load(
            LIBRARY_NAME,
            kernel_sources(),
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            build_directory=out_dir,
            is_python_module=False,
            verbose=False)
    except Exception as err:  # noqa: BLE001  (compiler output is the report)
        log = osp.join(out_dir, 'build.log')
        with open(log, 'w') as f:
            f.write(str(err))
        reason = (f'mmsn could not compile its CPU kernels '
                  f'({_first_error(err)}; full log: {log}), so {_COST}. '
                  f'Delete {out_dir} to try again; {_SILENCE}.')
        with open(failed, 'w') as f:
            f.write(reason)
        return reason
    finally:
        os.environ['PATH'] = path
    with open(done, 'w') as f:
        json.dump(info, f)
    _say(f'compiled in {time.monotonic() - start:.0f} s')
    return None


def _first_error(err: Exception) -> str:
    lines = str(err).splitlines()
    for line in lines:
        if 'error' in line.lower():
            return line.strip()[:300]
    return lines[0][:300] if lines else type(err).__name__


def _say(message: str) -> None:
    print(f'mmsn: {message}', file=sys.stderr, flush=True)
