# Metadata lives in setup.cfg; the requirements in requirements/*.txt (ranges
# in runtime.txt, extras demo/tests/downstream). This file adds:
#
# * the compiled CPU kernels, mmsn._C, when torch is importable at build time
#   (`pip install --no-build-isolation ...`, or `python setup.py build_ext
#   --inplace`). Otherwise, e.g. under pip's default build isolation, mmsn
#   compiles the same sources with the same flags on first use
#   (mmsn/ops/_extension.py), so every install ends with the kernels on a
#   machine with a C++ compiler. MMSN_WITH_OPS=0 skips them;
# * the files OpenMMLab's `mim` looks for in an installed package, under
#   mmsn/.mim/: configs, tools and model-index.yml (copied into wheels,
#   symlinked to the checkout for editable installs), so that
#   `mim train/test/run/search mmsn ...` work from a wheel.
import importlib.util
import os
import os.path as osp
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = osp.dirname(osp.abspath(__file__))
MIM_FILES = ('configs', 'tools', 'model-index.yml')
# tools/ scripts that set up this checkout, not tools of the package
CHECKOUT_ONLY_TOOLS = ('setup_env.sh', 'run_demo.sh', 'run_tests.sh',
                       'build_mmcv.sh')


def requirements(name):
    with open(osp.join(ROOT, 'requirements', f'{name}.txt')) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line]


def check_wheel_command():
    """`pip install --no-build-isolation` builds with this environment's
    setuptools, which before 70.1 needs the separate `wheel` package; say so
    instead of setuptools' "invalid command 'bdist_wheel'"."""
    if not {'bdist_wheel', 'dist_info', 'editable_wheel'} & set(sys.argv):
        return
    for module in ('setuptools.command.bdist_wheel', 'wheel.bdist_wheel'):
        try:
            if importlib.util.find_spec(module) is not None:
                return
        except ImportError:
            continue
    import setuptools
    sys.exit(f'mmsn: building a wheel with setuptools {setuptools.__version__}'
             ' needs the `wheel` package, which this environment lacks (pip '
             'install --no-build-isolation uses the environment as it is). '
             'Run `pip install wheel` and repeat, or install without '
             '--no-build-isolation: mmsn then compiles its CPU kernels on '
             'first use.')


def load_extension_module():
    """mmsn/ops/_extension.py (sources, flags, build info), without
    importing the mmsn package, which needs its dependencies."""
    spec = importlib.util.spec_from_file_location(
        '_mmsn_extension', osp.join(ROOT, 'mmsn', 'ops', '_extension.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_options():
    if os.environ.get('MMSN_WITH_OPS', '1') == '0':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print('mmsn: torch is not importable at build time (pip builds in '
              'an isolated environment unless --no-build-isolation); mmsn '
              'will compile its CPU kernels on first use instead')
        return {}
    ext = load_extension_module()
    sources = [osp.relpath(p, ROOT) for p in ext.kernel_sources()]

    class BuildExtRecordingTorch(BuildExtension.with_options(use_ninja=True)):
        """Builds mmsn._C and writes beside it the torch (and sources) it
        was built for and its size and SHA-256; mmsn loads it only into
        that torch, and only if it is unchanged. A failed build
        does not fail the install: mmsn retries on first use."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                print(f'mmsn: building mmsn._C failed ({err}); mmsn will '
                      f'try to compile its CPU kernels on first use')
                return
            for extension in self.extensions:
                # with the library's size and SHA-256: a damaged copy is
                # not loaded
                ext.record_prebuilt(self.get_ext_fullpath(extension.name))

    return dict(
        ext_modules=[
            CppExtension(
                'mmsn._C',
                sources,
                extra_compile_args=ext.CXX_FLAGS,
                extra_link_args=ext.LD_FLAGS)
        ],
        cmdclass={'build_ext': BuildExtRecordingTorch})


def add_mim_files(target, link):
    """Put MIM_FILES into ``target`` (mmsn/.mim): relative symlinks into the
    checkout (editable installs) or copies (wheels)."""
    os.makedirs(target, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(ROOT, name), osp.join(target, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if link:
            os.symlink(osp.relpath(src, target), dst)
        elif osp.isdir(src):
            shutil.copytree(
                src, dst,
                ignore=shutil.ignore_patterns('__pycache__', '*.pyc',
                                              *CHECKOUT_ONLY_TOOLS))
        else:
            shutil.copyfile(src, dst)


class BuildPyWithMim(build_py):
    """build_py that also provides mmsn/.mim (see add_mim_files)."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            add_mim_files(osp.join(ROOT, 'mmsn', '.mim'), link=True)
        else:
            add_mim_files(
                osp.join(self.build_lib, 'mmsn', '.mim'), link=False)


check_wheel_command()
options = extension_options()
options.setdefault('cmdclass', {})['build_py'] = BuildPyWithMim
setup(
    install_requires=requirements('runtime'),
    extras_require={
        name: requirements(name)
        for name in ('demo', 'tests', 'downstream')
    },
    **options)
