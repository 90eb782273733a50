# Metadata lives in setup.cfg. This file adds the optional compiled CPU
# kernels (mmsn._C) and keeps `pip install -e .` working with setuptools < 80
# (which mmengine's pkg_resources use requires).
#
# The kernels build against the installed torch, so install with
# `pip install --no-build-isolation -e .`. MMSN_WITH_OPS=0 skips them (or a
# machine without torch at build time does); mmsn then uses PyTorch's native
# kernels, which give the same numbers more slowly.
import os

from setuptools import setup


def extensions():
    if os.environ.get('MMSN_WITH_OPS', '1') == '0':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print('mmsn: torch is not importable at build time; '
              'building without the compiled CPU kernels')
        return {}
    ext = CppExtension(
        'mmsn._C', ['mmsn/ops/csrc/switchable_norm_cpu.cpp'],
        # -fno-math-errno: sqrt inlines (and vectorizes) without an errno path
        extra_compile_args=['-O3', '-fopenmp', '-fno-math-errno'],
        extra_link_args=['-fopenmp'])
    return dict(ext_modules=[ext],
                cmdclass={'build_ext': BuildExtension.with_options(
                    use_ninja=True)})


setup(**extensions())
