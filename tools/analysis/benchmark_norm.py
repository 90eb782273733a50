"""Speed and memory of Switchable Normalization against BatchNorm/GroupNorm.

Prints markdown tables, all measured in this one process with the
implementations interleaved (every repetition runs each implementation once,
in rotating order) and the median taken, so that a busy machine affects all
columns alike:

1. per norm shape of ResNet-50 (batch 32 and 8): BN, GN(32), the authors'
   SN formulation (written out below from the paper's equations) and mmsn's
   SN: forward (training mode), forward+backward, eval forward, memory kept
   alive for backward, and the ratios;
2. a whole ResNet-50 (mmpretrain, norm_cfg BN vs SN, batch 8, 224x224):
   training step (forward, loss, backward, SGD step) and eval forward;
3. on the CPU with mmsn._C built, where SN's time goes: each compiled pass
   (and the one-sweep forward used with running statistics) against BN's
   and GN's kernels, with the bandwidth each pass reaches over the bytes it
   must move.

``--device cuda`` writes the GPU report instead (benchmark_norm_cuda.py:
float32 and bf16, torch.compile of the composite path, ResNet-50 at batch
32 with AMP, the Triton kernels pass by pass, the targets).

Usage::

    python tools/analysis/benchmark_norm.py               # full run
    python tools/analysis/benchmark_norm.py --quick       # 4 shapes, few reps
    python tools/analysis/benchmark_norm.py --device cuda \
        --output docs/benchmark_gpu.md
"""
import argparse
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import mmsn  # noqa: F401  (registers 'SN' for mmcv's build_norm_layer)
from mmsn import SwitchableNorm2d
from mmsn.analysis.host_path import share_convolutions
from mmsn.ops import compiled_kernels_available

# (C, H=W, number of norm layers of this shape in ResNet-50)
RESNET50_NORM_SHAPES = [
    (64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7),
    (512, 28, 5), (256, 28, 1), (256, 14, 11), (1024, 14, 7), (512, 14, 1),
    (512, 7, 5), (2048, 7, 4)
]
QUICK_SHAPES = [(32, 64, 56), (32, 256, 14), (32, 2048, 7), (8, 64, 112)]
SECTIONS = ['shapes', 'resnet', 'passes', 'host', 'compile']
KEEP_FREED_MEMORY = ('glibc.malloc.mmap_threshold=4294967296:'
                     'glibc.malloc.trim_threshold=4294967296')


class AuthorsSN(nn.Module):
    """SN as the authors formulate it (paper's equations with their
    numerics): per-branch statistics on ``x.view(N, C, -1)``, unbiased IN
    variance, LN and BN statistics derived from the IN ones through the
    second moments, moving-average running statistics for the BN branch."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer('running_mean', torch.zeros(1, num_features, 1))
        self.register_buffer('running_var', torch.ones(1, num_features, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        second = var_in + mean_in**2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn**2
            with torch.no_grad():  # (in float32 under autocast)
                self.running_mean.lerp_(mean_bn.float(), self.momentum)
                self.running_var.lerp_(var_bn.float(), self.momentum)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mw = torch.softmax(self.mean_weight, 0)
        vw = torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def make_norms(c: int) -> Dict[str, nn.Module]:
    return {
        'BN': nn.BatchNorm2d(c),
        'GN': nn.GroupNorm(32, c),
        'refSN': AuthorsSN(c),
        'SN': SwitchableNorm2d(c),
    }


class Timer:

    def __init__(self, device: torch.device):
        self.sync = (torch.cuda.synchronize
                     if device.type == 'cuda' else (lambda: None))

    def __call__(self, fn: Callable[[], None]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def interleaved_medians(fns: Dict[str, Callable[[], None]], reps: int,
                        timer: Timer, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each function, run in rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timer(fns[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps alive for backward."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), storage.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def bench_shape(shape, args, device, timer) -> Dict[str, Dict[str, float]]:
    n, c, hw = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw, device=device, dtype=args.dtype)
    x.mul_(1.5).add_(0.5)
    x.requires_grad_()
    dy = torch.randn_like(x)
    norms = {k: m.to(device).train() for k, m in make_norms(c).items()}

    def forward(m):
        return lambda: m(x)

    def forward_backward(m):
        params = [p for p in m.parameters()]

        def fn():
            x.grad = None
            for p in params:
                p.grad = None
            m(x).backward(dy)
        return fn

    def eval_forward(m):
        def fn():
            with torch.no_grad():
                m(x)
        return fn

    res: Dict[str, Dict[str, float]] = {k: {} for k in norms}
    # training mode for forward and forward+backward
    for key, make in (('fwd', forward), ('fwdbwd', forward_backward)):
        med = interleaved_medians({k: make(m) for k, m in norms.items()},
                                  args.reps, timer)
        for k, t in med.items():
            res[k][key] = t * 1e3
    for m in norms.values():
        m.eval()
    med = interleaved_medians({k: eval_forward(m) for k, m in norms.items()},
                              args.reps, timer)
    for k, t in med.items():
        res[k]['eval'] = t * 1e3
    in_bytes = x.numel() * x.element_size()
    for k, m in norms.items():
        m.train()
        res[k]['mem'] = saved_bytes(lambda: m(x)) / in_bytes
    x = dy = norms = None  # free them before gc.collect()
    gc.collect()
    return res


def fmt(v: float) -> str:
    return f'{v:.3g}' if v < 100 else f'{v:.0f}'


def print_shape_tables(rows):
    print('### Per layer (ms, median; ratios of mmsn SN)\n')
    print('| shape (N, C, H, W) | BN | GN(32) | authors\' SN | mmsn SN | '
          'SN/BN | SN/GN | authors\'/BN |')
    print('|---|---|---|---|---|---|---|---|')
    for shape, r in rows:
        n, c, hw = shape
        print(f'| {n}, {c}, {hw}, {hw} | {fmt(r["BN"]["fwdbwd"])} | '
              f'{fmt(r["GN"]["fwdbwd"])} | {fmt(r["refSN"]["fwdbwd"])} | '
              f'{fmt(r["SN"]["fwdbwd"])} | '
              f'{r["SN"]["fwdbwd"] / r["BN"]["fwdbwd"]:.2f} | '
              f'{r["SN"]["fwdbwd"] / r["GN"]["fwdbwd"]:.2f} | '
              f'{r["refSN"]["fwdbwd"] / r["BN"]["fwdbwd"]:.2f} |')
    print('\nForward+backward above. Forward (training mode) and eval '
          'forward, ms:\n')
    print('| shape | fwd BN | fwd GN | fwd authors\' | fwd SN | SN/BN | '
          'eval BN | eval GN | eval authors\' | eval SN | SN/BN |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for shape, r in rows:
        n, c, hw = shape
        f = [fmt(r[k]['fwd']) for k in ('BN', 'GN', 'refSN', 'SN')]
        e = [fmt(r[k]['eval']) for k in ('BN', 'GN', 'refSN', 'SN')]
        print(f'| {n}, {c}, {hw}, {hw} | ' + ' | '.join(f) +
              f' | {r["SN"]["fwd"] / r["BN"]["fwd"]:.2f} | ' + ' | '.join(e) +
              f' | {r["SN"]["eval"] / r["BN"]["eval"]:.2f} |')
    print('\nMemory kept alive for backward, in units of the input size:\n')
    print('| shape | BN | GN(32) | authors\' SN | mmsn SN |')
    print('|---|---|---|---|---|')
    for shape, r in rows:
        n, c, hw = shape
        print(f'| {n}, {c}, {hw}, {hw} | ' + ' | '.join(
            f'{r[k]["mem"]:.2f}' for k in ('BN', 'GN', 'refSN', 'SN')) + ' |')


def summarize(rows, weights):
    def med(key, a, b):
        return statistics.median(r[a][key] / r[b][key] for _, r in rows)

    def weighted(key, a, b):
        num = sum(w * r[a][key] for (_, r), w in zip(rows, weights))
        den = sum(w * r[b][key] for (_, r), w in zip(rows, weights))
        return num / den

    print('\n### Summary over the shapes above\n')
    print('| ratio | median over shapes | time-weighted by ResNet-50 '
          'layer count |')
    print('|---|---|---|')
    for label, key, a, b in (
            ('SN / BN, forward+backward', 'fwdbwd', 'SN', 'BN'),
            ('SN / GN(32), forward+backward', 'fwdbwd', 'SN', 'GN'),
            ('authors\' SN / BN, forward+backward', 'fwdbwd', 'refSN', 'BN'),
            ('SN / BN, forward (training)', 'fwd', 'SN', 'BN'),
            ('SN / BN, eval forward', 'eval', 'SN', 'BN')):
        print(f'| {label} | {med(key, a, b):.2f} | '
              f'{weighted(key, a, b):.2f} |')
    worst = max(r['SN']['mem'] for _, r in rows)
    print(f'| SN memory for backward / input (max) | {worst:.3f} | |')
    return dict(sn_bn=med('fwdbwd', 'SN', 'BN'),
                sn_gn_max=max((r['SN']['fwdbwd'] / r['GN']['fwdbwd'], shape)
                              for shape, r in rows))


def resnet50_steps(device, dtype, batch):
    """ResNet-50s (mmpretrain) with BN and with SN, and makers of a closure
    running one training step (forward, loss, backward, SGD step) or one
    eval forward of either, under autocast unless ``dtype`` is float32."""
    from mmpretrain.models import ResNet

    def build(norm):
        torch.manual_seed(0)
        # PyTorch's default initialization (init_weights only logs here)
        backbone = ResNet(depth=50, norm_cfg=dict(type=norm))
        model = nn.Sequential(backbone, _Head(2048, 1000)).to(device)
        return model

    models = {'BN': build('BN'), 'SN': build('SN')}
    # the same convolutions: the step times then compare the norms only
    share_convolutions(models['SN'], models['BN'])
    x = torch.randn(batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (batch, ), device=device)
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        for k, m in models.items()
    }
    autocast = (torch.autocast(device.type, dtype=dtype)
                if dtype != torch.float32 else _Null())

    def train_step(k):
        model, opt = models[k], opts[k]

        def fn():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
        return fn

    def eval_forward(k):
        model = models[k]

        def fn():
            with torch.no_grad(), autocast:
                model(x)
        return fn

    return models, train_step, eval_forward


def bench_resnet50(args, device, timer):
    batch = args.resnet_batch
    models, train_step, eval_forward = resnet50_steps(device, args.dtype,
                                                      batch)
    for m in models.values():
        m.train()
    train = interleaved_medians({k: train_step(k) for k in models},
                                args.resnet_reps, timer, warmup=2)
    for m in models.values():
        m.eval()
    evals = interleaved_medians({k: eval_forward(k) for k in models},
                                args.resnet_reps, timer, warmup=1)
    print(f'\n### ResNet-50 (mmpretrain), batch {batch}, 224x224 '
          '(ms, median)\n')
    print('| | BN | SN | SN / BN |')
    print('|---|---|---|---|')
    for label, t in (('training step', train), ('eval forward', evals)):
        print(f'| {label} | {t["BN"] * 1e3:.0f} | {t["SN"] * 1e3:.0f} | '
              f'{t["SN"] / t["BN"]:.3f} |')
    return dict(train=train['SN'] / train['BN'],
                eval=evals['SN'] / evals['BN'])


def bench_passes(args, timer):
    """Time of each compiled SN pass and of BN's/GN's kernels (ms), and the
    bandwidth of SN's passes over the bytes each must move (GB/s)."""
    ops = torch.ops.mmsn
    print('\n### Where the time goes: compiled SN passes vs BN and GN kernels '
          '(ms; GB/s over the bytes each pass must move)\n')
    print('| shape | SN moments (1 read) | SN affine (1 read, 1 write) | '
          'SN backward (4 reads, 1 write) | BN fwd | BN bwd | GN fwd | '
          'GN bwd | SN eval sweep (1 read, 1 write) | BN eval |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for n, c, hw in QUICK_SHAPES:
        torch.manual_seed(0)
        x4 = torch.randn(n, c, hw, hw, requires_grad=True)
        x = x4.detach().view(n, c, -1)
        dy = torch.randn_like(x)
        mean, var = ops.instance_moments(x, 1)
        mean_bn, var_bn = mean.mean(0), var.mean(0)
        logits, ones = torch.zeros(3), torch.ones(c)
        bn, gn = nn.BatchNorm2d(c), nn.GroupNorm(32, c)
        bn_eval = nn.BatchNorm2d(c).eval()
        y_bn, y_gn = bn(x4), gn(x4)

        def grad_of(y):
            return lambda: torch.autograd.grad(y, x4, dy.view_as(x4),
                                               retain_graph=True)

        med = interleaved_medians({
            'moments': lambda: ops.instance_moments(x, 1),
            'affine': lambda: ops.sn_affine(x, mean, var, ones, ones, logits,
                                            logits, mean_bn, var_bn, 1e-5),
            'backward': lambda: ops.sn_backward(
                dy, x, mean, var, ones, logits, logits, mean_bn, var_bn,
                True, 1e-5, 1, True),
            'bn_fwd': lambda: bn(x4),
            'bn_bwd': grad_of(y_bn),
            'gn_fwd': lambda: gn(x4),
            'gn_bwd': grad_of(y_gn),
            # running statistics: the one-sweep forward
            'sweep': lambda: ops.sn_forward_fixed(x, ones, ones, logits,
                                                  logits, mean_bn, var_bn,
                                                  1e-5, 1),
            'bn_eval': lambda: bn_eval(x4.detach()),
        }, args.reps, timer)
        size = x.numel() * x.element_size()

        def sn(key, tensors):
            gbs = tensors * size / med[key] / 1e9
            return f'{med[key] * 1e3:.3g} ({gbs:.0f})'

        print(f'| {n}, {c}, {hw}, {hw} | {sn("moments", 1)} | '
              f'{sn("affine", 2)} | {sn("backward", 5)} | ' + ' | '.join(
                  f'{med[k] * 1e3:.3g}'
                  for k in ('bn_fwd', 'bn_bwd', 'gn_fwd', 'gn_bwd')) +
              f' | {sn("sweep", 2)} | {med["bn_eval"] * 1e3:.3g} |')


class _Head(nn.Module):

    def __init__(self, cin, classes):
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, feats):
        return self.fc(feats[-1].mean((2, 3)))


class _Null:

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default=None,
                        choices=['float32', 'bfloat16', 'float16'],
                        help='default: float32 on the CPU; float32 and '
                        'bfloat16 on CUDA')
    parser.add_argument('--quick', action='store_true',
                        help='4 shapes and few repetitions')
    parser.add_argument('--reps', type=int, default=None)
    parser.add_argument('--batches', type=int, nargs='+', default=[32, 8])
    parser.add_argument('--resnet-batch', type=int, default=None,
                        help='default: 8 on the CPU, 32 on CUDA')
    parser.add_argument('--resnet-reps', type=int, default=None)
    parser.add_argument('--skip-resnet', action='store_true')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (CPU)')
    parser.add_argument('--sections', nargs='+', default=SECTIONS,
                        choices=SECTIONS, help='what to run (CPU; default: '
                        'all)')
    parser.add_argument('--keep-allocator', action='store_true',
                        help='do not re-run with glibc keeping freed memory')
    host = parser.add_argument_group('host path (CPU)')
    host.add_argument('--host-reps', type=int, default=21)
    host.add_argument('--host-resnet-reps', type=int, default=15)
    host.add_argument('--compile-batch', type=int, default=8)
    host.add_argument('--compile-size', type=int, default=224)
    host.add_argument('--compile-reps', type=int, default=7)
    cuda = parser.add_argument_group('GPU report (--device cuda)')
    cuda.add_argument('--gpu-report', action='store_true',
                      help='write the GPU report on any device (a dry run '
                      'on the CPU)')
    cuda.add_argument('--shapes', nargs='+', metavar='N,C,HW',
                      help='these shapes instead of ResNet-50\'s')
    cuda.add_argument('--output', help='also write the report here '
                      '(default with --device cuda: docs/benchmark_gpu.md)')
    cuda.add_argument('--sn-path', default='',
                      help='force mmsn\'s SN path (MMSN_SN_PATH values)')
    cuda.add_argument('--compile-every', type=int, default=4,
                      help='torch.compile the composite path on every '
                      'Nth shape (0: never); each compile takes seconds')
    cuda.add_argument('--triton-tiles', type=int, nargs='*', default=[2048],
                      help='tile sizes of the Triton pass-by-pass table')
    cuda.add_argument('--part', default='all',
                      choices=['all', 'host-toll', 'rest'],
                      help='host-toll: the header, the host toll per layer '
                      'and the compiled ResNet-50 step only; rest: the '
                      'others, appended to --output')
    cuda.add_argument('--compile-backend', default='inductor',
                      help='torch.compile backend of the ResNet-50 step '
                      '(inductor: mode reduce-overhead)')
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda_run = device.type == 'cuda' or args.gpu_report
    if args.dtype is not None:
        args.dtype = getattr(torch, args.dtype)
    elif not cuda_run:
        args.dtype = torch.float32
    if args.reps is None:
        args.reps = 5 if args.quick else (25 if cuda_run else 11)
    if args.resnet_reps is None:
        args.resnet_reps = 3 if args.quick else (10 if cuda_run else 7)
    if args.resnet_batch is None:
        args.resnet_batch = 32 if cuda_run else 8
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda_run:
        if args.output is None and not args.gpu_report:
            args.output = os.path.join(os.path.dirname(__file__), '..', '..',
                                       'docs', 'benchmark_gpu.md')
        # the sibling module (on sys.path as this script's folder)
        import benchmark_norm_cuda
        benchmark_norm_cuda.run(args, sys.modules[__name__])
        return
    timer = Timer(device)

    if device.type == 'cpu' and not args.keep_allocator and \
            os.environ.get('GLIBC_TUNABLES') is None:
        # Per-shape times of BN, GN and SN alike swing up to 2x from run to
        # run when glibc hands large freed blocks back to the system (page
        # faults at the next allocation): run again with them kept.
        env = dict(os.environ, GLIBC_TUNABLES=KEEP_FREED_MEMORY)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    if args.quick:
        shapes = QUICK_SHAPES
        weights = [1] * len(shapes)
    else:
        shapes, weights = [], []
        for n in args.batches:
            for c, hw, count in RESNET50_NORM_SHAPES:
                shapes.append((n, c, hw))
                weights.append(count)
    name = (torch.cuda.get_device_name(device) if device.type == 'cuda'
            else f'CPU, {torch.get_num_threads()} threads')
    compiled = device.type == 'cpu' and compiled_kernels_available()
    kernels = ('compiled mmsn._C' if compiled else
               'PyTorch native (mmsn._C not built)'
               if device.type == 'cpu' else 'generic PyTorch ops')
    allocator = os.environ.get('GLIBC_TUNABLES')
    print(f'## Norm layers, {name}, {str(args.dtype)[6:]}, torch '
          f'{torch.__version__}, {args.reps} interleaved repetitions; '
          f'SN kernels: {kernels}\n')
    if allocator == KEEP_FREED_MEMORY:
        print('glibc keeps freed memory in the process (GLIBC_TUNABLES='
              f'{allocator}, set by this script unless --keep-allocator), '
              'so that large blocks are not mapped in again at every step.\n')
    results = {}
    if 'shapes' in args.sections:
        rows = []
        for i, shape in enumerate(shapes, 1):
            print(f'[{i}/{len(shapes)}] {shape}', file=sys.stderr, flush=True)
            rows.append((shape, bench_shape(shape, args, device, timer)))
        print_shape_tables(rows)
        results['shapes'] = summarize(rows, weights)
    if 'resnet' in args.sections and not args.skip_resnet:
        results['resnet'] = bench_resnet50(args, device, timer)
    if 'passes' in args.sections and compiled and \
            args.dtype == torch.float32:
        bench_passes(args, timer)
    if device.type == 'cpu':
        import benchmark_norm_host  # the sibling module
        results.update(benchmark_norm_host.run(args))
        print_targets(results)


def print_targets(results):
    """Issue 17's CPU targets against what this run measured."""
    rows = []
    if 'shapes' in results:
        worst, shape = results['shapes']['sn_gn_max']
        rows.append(('SN / GN(32) fwd+bwd, every shape (worst)',
                     f'{worst:.2f} at {shape}', 1.3, worst))
        rows.append(('SN / BN fwd+bwd, median over shapes',
                     f'{results["shapes"]["sn_bn"]:.2f}', 0.9,
                     results['shapes']['sn_bn']))
    if 'resnet' in results:
        for key, target in (('train', 1.03), ('eval', 1.05)):
            value = results['resnet'][key]
            rows.append((f'ResNet-50 batch 8 {key} SN / BN', f'{value:.3f}',
                         target, value))
    if 'layers' in results:
        for i, kind in enumerate(('training step', 'eval forward')):
            sn = {k: r[i] for k, r in results['layers'].items()
                  if k.startswith('SN')}
            worst = max(sn.values())
            rows.append((f'host time per call / BN, {kind} (worst SN '
                         'layer)', f'{worst:.2f}', 1.3, worst))
            ssn = results['layers']['SSN2d'][i]
            rows.append((f'host time per call / BN, {kind}, SSN2d',
                         f'{ssn:.2f}', None, ssn))
    if 'host_resnet' in results:
        for key, target in (('train', 1.05), ('eval', 1.20)):
            t = results['host_resnet'][key]
            for norm in ('SN', 'SSN'):
                value = t[norm] / t['BN']
                rows.append((f'host-bound ResNet-50 {key}, {norm} / BN',
                             f'{value:.3f}', target, value))
    if 'compile' in results:
        c = results['compile']
        for label in ('SN (plain ops)', 'SN (layer operators)'):
            value = c[label]['train'] / c['BN']['train']
            rows.append((f'compiled ResNet-50 step, {label} / BN',
                         f'{value:.3f}', None, value))
    print('\n### Targets (issue 17)\n')
    print('| ratio | measured | target | met |')
    print('|---|---|---|---|')
    for label, shown, target, value in rows:
        met = '' if target is None else ('yes' if value <= target else 'no')
        print(f'| {label} | {shown} | {target or ""} | {met} |')


if __name__ == '__main__':
    main()
