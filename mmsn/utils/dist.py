"""Distributed runs on machines without CUDA (gloo), for the train/test tools.

mmengine's ``init_dist`` calls ``torch.cuda.set_device`` and fails on a
CPU-only machine; the Runner skips it when a process group already exists.
So the tools start the gloo group here first, from the same launcher
variables mmengine reads (torchrun, Slurm, MPI), and have DDP wrap the model
without ``device_ids``.
"""
import contextlib
import datetime
import gc
import os
import subprocess
from typing import Iterator

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict


def _set_env_from_launcher(launcher: str) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* as mmengine's init_dist."""
    if launcher == 'slurm':
        ntasks = int(os.environ['SLURM_NTASKS'])
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['WORLD_SIZE'] = str(ntasks)
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
        if 'MASTER_ADDR' not in os.environ:
            node_list = os.environ['SLURM_NODELIST']
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1')
        os.environ.setdefault('MASTER_PORT', '29500')
    elif launcher == 'mpi':
        os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', '29500')


def init_cpu_distributed(cfg: Config) -> bool:
    """Start a gloo process group when ``cfg.launcher`` is distributed and
    CUDA is absent; True if this call created it.

    Sets ``cfg.env_cfg.dist_cfg.backend = 'gloo'`` and a
    ``model_wrapper_cfg`` with ``device_ids=None`` (mmengine passes
    LOCAL_RANK, which DDP refuses for a CPU module).
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available() \
            or torch_dist.is_initialized():
        return False
    _set_env_from_launcher(cfg.launcher)
    dist_cfg = cfg.setdefault('env_cfg', ConfigDict()).setdefault(
        'dist_cfg', ConfigDict())
    dist_cfg.backend = 'gloo'
    timeout = datetime.timedelta(seconds=dist_cfg.get('timeout', 1800))
    torch_dist.init_process_group(backend='gloo', timeout=timeout)
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper
    return True


def destroy_cpu_distributed(created: bool) -> None:
    """Tear down the gloo group that :func:`init_cpu_distributed` created.

    Left to interpreter exit, gloo's threads can abort the process
    ("terminate called without an active exception") after a successful
    run, which torchrun reports as a failure.
    """
    if created and torch_dist.is_initialized():
        # what still holds the group (a released Runner's DDP wrapper in a
        # reference cycle) goes first: destroyed after the group, at exit,
        # it can abort the process the same way
        gc.collect()
        torch_dist.barrier()
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def cpu_distributed(cfg: Config) -> Iterator[bool]:
    """``with cpu_distributed(cfg):`` around building and running a Runner:
    :func:`init_cpu_distributed` before, :func:`destroy_cpu_distributed`
    after a run that returns normally (an exception leaves the group to
    the failing process's exit, as a barrier would hang the others)."""
    created = init_cpu_distributed(cfg)
    yield created
    destroy_cpu_distributed(created)
