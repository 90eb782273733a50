"""Run a test function in several gloo processes with a bounded wait."""
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# gloo's own timeout for one collective, and the parent's for the whole run
COLLECTIVE_TIMEOUT_S = 60
RUN_TIMEOUT_S = 600


def _entry(fn, rank, world, init_file, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            'gloo', init_method=f'file://{init_file}', rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        fn(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def run_processes(fn, world, tmp_path, *args, timeout=RUN_TIMEOUT_S):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined
    in one gloo group; return their exit codes (None: still running after
    ``timeout`` seconds, then killed)."""
    ctx = mp.get_context('spawn')
    init_file = os.path.join(str(tmp_path), f'init_{world}_{fn.__name__}')
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world, init_file, args))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        codes.append(p.exitcode)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes
