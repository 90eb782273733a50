"""Implementations of the big-tensor passes of SN (see :mod:`.base`)."""
import torch


def backend_name(device) -> str:
    """Name of the implementation SN's passes use on ``device``.

    Minimal stand-in for the environment report (mmsn.utils.collect_env):
    'compiled' (mmsn's CPU kernels), 'native' (PyTorch's CPU kernels) or
    'generic' (device-agnostic ops).
    """
    from ..switchable_norm import compiled_kernels_available
    if torch.device(device).type != 'cpu':
        return 'generic'
    return 'compiled' if compiled_kernels_available() else 'native'


__all__ = ['backend_name']
