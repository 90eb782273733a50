"""The environment report: ``python -m mmsn.utils.collect_env``.

mmengine's report (Python, compiler, CUDA, torch and its build) plus the
OpenMMLab packages next to mmsn, where mmsn's compiled CPU kernels come from,
and which implementation of SN's passes each device will use.
"""
import os
import os.path as osp
import subprocess
from importlib.util import find_spec

import torch
from mmengine.utils.dl_utils import collect_env as collect_base_env

import mmsn
from mmsn.ops._extension import compiled_ops_origin
from mmsn.ops.backends import backend_name
from mmsn.version import installed_version

# name in the report -> module
OPENMMLAB_PACKAGES = {
    'MMCV': 'mmcv',
    'MMPreTrain': 'mmpretrain',
    'MMDetection': 'mmdet',
    'MMSegmentation': 'mmseg',
}
MMSN_VARIABLES = ('MMSN_WITH_OPS', 'MMSN_SN_PATH', 'MMSN_CACHE')
BACKEND_DESCRIPTIONS = {
    'compiled': "mmsn's compiled CPU kernels",
    'native': "PyTorch's CPU kernels (mmsn's compiled ones are not loaded)",
    'generic': 'device-agnostic PyTorch ops',
}


def _mmsn_version() -> str:
    """The version, with the commit when mmsn runs from a git checkout."""
    root = osp.dirname(osp.dirname(osp.abspath(mmsn.__file__)))
    if not osp.exists(osp.join(root, '.git')):   # an installed package
        return mmsn.__version__
    try:
        sha = subprocess.run(['git', '-C', root, 'rev-parse', '--short',
                              'HEAD'], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ''
    return f'{mmsn.__version__}+{sha}' if sha else mmsn.__version__


def sn_devices():
    """'cpu' and every visible accelerator."""
    devices = ['cpu']
    if torch.cuda.is_available():
        devices += [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    return devices


def collect_env(with_torch_compiling_info: bool = False) -> dict:
    """Collect the versions and SN backends of the running environment."""
    env_info = collect_base_env()
    if not with_torch_compiling_info:
        env_info.pop('PyTorch compiling details', None)
    for name, module in OPENMMLAB_PACKAGES.items():
        if find_spec(module) is not None:
            env_info[name] = installed_version(module) or 'unknown'
    if 'MMCV' in env_info:     # mmdet/mmseg need the compiled ops
        with_ops = find_spec('mmcv._ext') is not None
        env_info['MMCV'] += ' (full, with ops)' if with_ops else (
            ' (lite, no compiled ops)')
    env_info['MMSN'] = _mmsn_version()
    env_info['MMSN compiled CPU kernels'] = compiled_ops_origin()
    for device in sn_devices():
        name = backend_name(device)
        env_info[f'MMSN SN backend ({device})'] = (
            f'{name}: {BACKEND_DESCRIPTIONS[name]}'
            if name in BACKEND_DESCRIPTIONS else name)
    for variable in MMSN_VARIABLES:
        if variable in os.environ:
            env_info[variable] = os.environ[variable]
    return env_info


def main() -> None:
    for name, value in collect_env().items():
        print(f'{name}: {value}')


if __name__ == '__main__':
    main()
