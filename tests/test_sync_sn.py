"""SyncSN over two gloo processes equals SN over the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmsn import SwitchableNorm2d, SyncSwitchableNorm
from test_switchable_norm import make_input, make_layer

WORLD = 2
SHAPE = (4, 6, 3, 3)


def _worker(rank, init_file, out_dir, dtype):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=WORLD)
    try:
        layer = make_layer(SyncSwitchableNorm, dtype=dtype)
        x = make_input(SHAPE, dtype)
        g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5),
                        dtype=dtype)
        part = slice(rank * 2, rank * 2 + 2)
        x_part = x[part].clone().requires_grad_()
        y = layer(x_part)
        y.backward(g[part])
        torch.save(
            dict(y=y.detach(), x_grad=x_part.grad,
                 grads={n: p.grad for n, p in layer.named_parameters()},
                 running=(layer.running_mean, layer.running_var)),
            os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def test_sync_sn_two_processes_equal_sn_on_whole_batch(tmp_path):
    dtype = torch.float64
    mp.start_processes(_worker, args=(str(tmp_path / 'init'), str(tmp_path),
                                      dtype), nprocs=WORLD, join=True,
                       start_method='spawn')
    results = [torch.load(tmp_path / f'rank{r}.pth') for r in range(WORLD)]

    layer = make_layer(SwitchableNorm2d, dtype=dtype)
    x = make_input(SHAPE, dtype).requires_grad_()
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5),
                    dtype=dtype)
    y = layer(x)
    y.backward(g)

    torch.testing.assert_close(torch.cat([r['y'] for r in results]), y)
    torch.testing.assert_close(torch.cat([r['x_grad'] for r in results]),
                               x.grad)
    for name, param in layer.named_parameters():
        # each process holds the gradient of its own loss; DDP sums them
        torch.testing.assert_close(
            sum(r['grads'][name] for r in results), param.grad)
    for r in results:
        torch.testing.assert_close(r['running'][0], layer.running_mean)
        torch.testing.assert_close(r['running'][1], layer.running_var)
