"""Writing files so that a failure leaves nothing half-written."""
import os
import os.path as osp
import tempfile

import torch


def save_atomically(obj, dst: str) -> None:
    """``torch.save(obj, dst)`` through a temporary file in the same folder,
    so a failed save leaves no partial ``dst`` (and an existing one
    untouched)."""
    out_dir = osp.dirname(osp.abspath(dst))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix='.tmp')
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, dst)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
