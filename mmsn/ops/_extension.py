"""How mmsn obtains its compiled CPU kernels (the ``torch.ops.mmsn`` ops).

The one place that knows it; the backends only ask :func:`load_compiled_ops`
for the op namespace. In order:

1. ``MMSN_WITH_OPS=0``: none (SN runs on PyTorch's own kernels).
2. ``mmsn._C``, built by ``setup.py`` when torch was importable at build time
   (``pip install --no-build-isolation``, or a wheel built that way), used
   only if ``_C.build.json`` beside it names the running torch, Python and
   kernel sources, and the library's size and SHA-256.
3. Otherwise the sources shipped in ``mmsn/ops/csrc`` are compiled on first
   use with ``torch.utils.cpp_extension`` (about 40 s, once per torch
   version) into ``$MMSN_CACHE/ext/<key>`` (default ``~/.cache/mmsn``) and
   loaded from there afterwards. A file lock lets processes that start
   together (distributed ranks, parallel tests) compile once and share it.
   The library is built in a staging folder and moved into place whole;
   its size and SHA-256, recorded in ``built.json``, are checked before
   every load, and a library that does not match is compiled again (a
   truncated library would otherwise kill the process with SIGBUS inside
   ``dlopen``).

So every way of installing mmsn ends with the same kernels on a machine
with a C++ compiler; without one, the reason says what is missing and
what it costs.
"""
import functools
import glob
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import os.path as osp
import platform
import shutil
import sys
import sysconfig
import time
import types
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
BUILD_RECORD = 'built.json'    # written next to it once it is in place

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


def library_record(path: str) -> Dict[str, object]:
    """Size and SHA-256 of a built library, recorded with it so that a
    damaged copy is never loaded."""
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
            size += len(chunk)
    return {'size': size, 'sha256': digest.hexdigest()}


def library_damage(path: str, recorded) -> Optional[str]:
    """Why the library at ``path`` is not the one ``recorded`` by
    :func:`library_record` at build time, or None if it is."""
    if not (isinstance(recorded, dict)
            and {'size', 'sha256'} <= set(recorded)):
        return f'its build record has no size and checksum: {recorded!r}'
    try:
        size = osp.getsize(path)
    except OSError as err:
        return f'it cannot be read: {err.strerror}'
    if size != recorded['size']:
        return (f'it has {size} bytes where {recorded["size"]} were built; '
                f'a full disk or an interrupted copy cuts files short')
    if library_record(path)['sha256'] != recorded['sha256']:
        return ('its SHA-256 differs from the one recorded at build: its '
                'bytes changed')
    return None


def write_build_record(path: str, record: Dict[str, object]) -> None:
    """Write ``record`` as JSON to ``path`` through a temporary file, so a
    reader sees the whole record or none."""
    tmp = f'{path}.{os.getpid()}.partial'
    with open(tmp, 'w') as f:
        json.dump(record, f)
    os.replace(tmp, path)


def record_prebuilt(library: str) -> str:
    """Write ``_C.build.json`` beside ``library`` (``mmsn._C`` built by
    setup.py): the build info and the library's size and SHA-256. Returns
    its path."""
    path = osp.join(osp.dirname(library), BUILD_INFO)
    write_build_record(path, dict(build_info(),
                                  library=library_record(library)))
    return path


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
    imported = getattr(sys.modules.get('mmsn._C'), '__file__', None)
    if imported:
        # `import mmsn._C` (pkgutil.walk_packages, API doc tools) ran first
        # and loaded the outdated library, which registered the operators:
        # loading the compiled ones too would register them twice, which
        # aborts the process.
        return None, (
            f'mmsn._C ({imported}) was imported before mmsn chose its '
            f'kernels, but it was built for other sources or another torch, '
            f'so {_COST}. Reinstall mmsn to rebuild it; {_SILENCE}.'), ''
    reason = _load_or_compile(info)
    if reason is not None:
        return None, reason, ''
    # An `import mmsn._C` (pkgutil.walk_packages, API doc tools) would load
    # the stale _C that setup.py left beside the package and register the
    # operators a second time, which aborts the process: it finds this.
    stand_in = types.ModuleType(
        'mmsn._C', 'mmsn\'s kernels, compiled on first use into '
        f'{build_directory(info)} (the operators are in torch.ops.mmsn)')
    sys.modules.setdefault('mmsn._C', stand_in)
    return (torch.ops.mmsn, None,
            f'compiled on first use, cached in {build_directory(info)}')


def _load_prebuilt(info: Dict[str, str],
                   package_dir: Optional[str] = None) -> Optional[str]:
    """Import ``mmsn._C`` from ``package_dir`` (mmsn's folder) if setup.py
    built it for exactly this torch and these sources and it is the file
    that was built; its path, else None."""
    package_dir = package_dir or osp.dirname(
        osp.dirname(osp.abspath(__file__)))
    try:
        with open(osp.join(package_dir, BUILD_INFO)) as f:
            built_for = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(built_for, dict) or 'library' not in built_for:
        return None     # recorded no checksum: do not trust it
    recorded = built_for.pop('library')
    if built_for != info:
        return None     # another torch or changed sources: compile instead
    found = [
        osp.join(package_dir, '_C' + suffix)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if osp.isfile(osp.join(package_dir, '_C' + suffix))
    ]
    if not found:
        return None
    damage = library_damage(found[0], recorded)
    if damage is not None:
        _say(f'not loading {found[0]}: {damage}. The CPU kernels are '
             f'compiled on first use instead; reinstall mmsn to repair it')
        return None
    # load exactly the file that was checked (registers the ops)
    spec = importlib.util.spec_from_file_location('mmsn._C', found[0])
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    sys.modules.setdefault('mmsn._C', module)
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


def _cache_damage(library: str, record: str) -> Optional[str]:
    """None when the cached ``library`` is the one its ``record`` describes;
    '' when nothing was built (or it was built without a record); else why
    it must not be loaded."""
    try:
        with open(record) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        return ''
    except (OSError, ValueError) as err:
        return f'its build record {record} cannot be read ({err})'
    if not isinstance(recorded, dict) or 'library' not in recorded:
        return ''   # built by an mmsn that recorded no checksum
    return library_damage(library, recorded['library'])


def _load_or_compile(info: Dict[str, str]) -> Optional[str]:
    """Load the library cached for ``info``, compiling it first if needed.
    ``None`` on success, else the reason."""
    out_dir = build_directory(info)
    library = osp.join(out_dir, LIBRARY_NAME + '.so')
    if _cache_damage(library, osp.join(out_dir, BUILD_RECORD)) is not None:
        reason = _compile_once(info, out_dir, library)
        if reason is not None:
            return reason
    try:
        torch.ops.load_library(library)
    except OSError as err:
        return (f'mmsn could not load its compiled CPU kernels ({err}); '
                f'{_COST}. Delete {out_dir} to compile them again; '
                f'{_SILENCE}.')
    return None


def _compile_once(info, out_dir, library) -> Optional[str]:
    """Compile into ``out_dir`` unless another process (holding the lock)
    did; None on success, else the reason."""
    record = osp.join(out_dir, BUILD_RECORD)
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        return _damage_note(library, record) + (
            f'mmsn found no C++ compiler (`{compiler}`; install g++, or '
            f'set CXX) to compile its CPU kernels, so {_COST}. With a '
            f'compiler they compile on first use (about 40 s, once per '
            f'torch version); {_SILENCE}.')
    ninja_dir = _find_ninja()
    if ninja_dir is None:
        return _damage_note(library, record) + (
            f'mmsn needs `ninja` (pip install ninja) to compile its CPU '
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
        damage = _cache_damage(library, record)
        if damage is None:              # another process compiled them
            return None
        failed = osp.join(out_dir, 'failed.txt')
        if osp.exists(failed):          # do not retry at every start
            with open(failed) as f:
                return f.read()
        return _compile(info, out_dir, library, ninja_dir, damage)
    finally:
        lock.release()


def _damage_note(library: str, record: str) -> str:
    """A sentence for a reason when the cached library is damaged, else ''.
    """
    damage = _cache_damage(library, record)
    if not damage:
        return ''
    return f'mmsn does not load its cached CPU kernels {library}: {damage}. '


def _compile(info, out_dir, library, ninja_dir, damage) -> Optional[str]:
    # Its import warns that a CUDA build of torch finds no CUDA runtime,
    # which does not matter for CPU kernels.
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    record = osp.join(out_dir, BUILD_RECORD)
    if osp.exists(record):      # readers wait on the lock, not load
        os.remove(record)
    # Built apart and moved into place whole, so that the library in
    # out_dir is complete or absent. Holding our lock, a staging folder
    # left behind is a killed build's.
    staging = osp.join(out_dir, 'staging')
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    again = (f'again ({library} is damaged: {damage}) '
             if damage else '')
    _say(f'compiling the CPU kernels of Switchable Normalization {again}for '
         f"torch {info['torch']} (once per torch version; about 40 s on 2 "
         f'idle cores) into {out_dir}; {_SILENCE}')
    start = time.monotonic()
    path = os.environ.get('PATH', '')
    os.environ['PATH'] = ninja_dir + os.pathsep + path
    try:
        cpp_extension.load(
            LIBRARY_NAME,
            kernel_sources(),
            # copies: load() appends torch's libraries to the list given,
            # which would change build_info() for the rest of the process
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            build_directory=staging,
            is_python_module=False,
            verbose=False)
    except Exception as err:  # noqa: BLE001  (compiler output is the report)
        log = osp.join(out_dir, 'build.log')
        with open(log, 'w') as f:
            f.write(str(err))
        reason = (f'mmsn could not compile its CPU kernels '
                  f'({_first_error(err)}; full log: {log}), so {_COST}. '
                  f'Delete {out_dir} to try again; {_SILENCE}.')
        with open(osp.join(out_dir, 'failed.txt'), 'w') as f:
            f.write(reason)
        return reason
    finally:
        os.environ['PATH'] = path
    built = osp.join(staging, LIBRARY_NAME + '.so')
    built_record = dict(info, library=library_record(built))
    os.replace(built, library)
    write_build_record(record, built_record)
    shutil.rmtree(staging, ignore_errors=True)
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
