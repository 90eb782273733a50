"""The GPU report of benchmark_norm.py (``--device cuda``), written as
markdown to stdout and ``--output`` (docs/benchmark_gpu.md).

All in one process on one card, implementations interleaved (each
repetition runs each once, in rotating order; medians), each call timed
with CUDA events after L2 has been evicted:

1. per ResNet-50 norm shape (batch 32 and 8), float32 and bfloat16 under
   autocast: training forward, forward+backward and eval forward of BN
   (cuDNN), GN(32), the authors' SN formulation, ``torch.compile`` of SN's
   composite path (on a subset of shapes: compiling takes seconds each) and
   mmsn's SN; memory kept alive for backward and peak memory of
   forward+backward, in units of the input;
2. a ResNet-50 (mmpretrain) training step and eval forward, BN vs SN,
   float32 and bf16 AMP: ms and images/s;
3. the issue's targets as ratios measured in this run;
4. mmsn's Triton kernels pass by pass against cuDNN's BN kernels, with the
   bandwidth each reaches over the bytes it must move, for a few tile
   sizes (to tune ``TritonBackend(tile=...)``);
5. first (``--part host-toll`` alone, ``rest`` for the others): what a
   layer costs the host and the launch queue, SN vs BN, and a ResNet-50
   step eager and under ``torch.compile(mode='reduce-overhead')``
   (benchmark_host_toll.py).
"""
import contextlib
import importlib
import statistics
import sys
from typing import Callable, Dict

import torch
from torch import nn

import benchmark_host_toll
from mmsn import SwitchableNorm2d

IMPLS = ('BN', 'GN', 'refSN', 'cSN', 'SN')
LABELS = {
    'BN': 'BN (cuDNN)',
    'GN': 'GN(32)',
    'refSN': 'authors\' SN',
    'cSN': 'compiled SN',
    'SN': 'mmsn SN'
}
L2_FLUSH_BYTES = 256 * 2**20


def force_sn_path(name: str):
    """Route mmsn's SN through one path for the whole run ('' leaves mmsn's
    own choice)."""
    if not name:
        return contextlib.nullcontext()
    return importlib.import_module('mmsn.ops.backends').forced(name)


class Report:
    """Prints markdown and writes it to ``path`` line by line (a run cut
    short keeps what it measured), after what is there with ``append``."""

    def __init__(self, path=None, append=False):
        self.file = open(path, 'a' if append else 'w') if path else None

    def __call__(self, text: str = '') -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + '\n')
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class CudaTimer:
    """Seconds of GPU time of one call (CUDA events), starting with L2
    evicted so that every implementation reads its input from memory."""

    def __init__(self, device):
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32,
                                 device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], None]) -> float:
        self.flush.zero_()
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def peak_bytes(device, fn) -> float:
    """Peak bytes allocated while ``fn`` runs, beyond what was allocated
    before (CUDA only: NaN elsewhere)."""
    if device.type != 'cuda':
        return float('nan')
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _name(dtype) -> str:
    return str(dtype).replace('torch.', '')


def bench_shape(common, shape, dtype, args, device, timer, compile_it):
    n, c, hw = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype)
    x.mul_(1.5).add_(0.5)
    x.requires_grad_()
    dy = torch.randn_like(x)
    norms = {k: m.to(device).train() for k, m in common.make_norms(c).items()}
    if compile_it:
        norms['cSN'] = torch.compile(SwitchableNorm2d(c).to(device).train())
    amp = _autocast(device, dtype)

    def forward(m):
        def fn():
            with amp:
                m(x)
        return fn

    def forward_backward(m):
        params = list(m.parameters())

        def fn():
            x.grad = None
            for p in params:
                p.grad = None
            with amp:
                y = m(x)
            y.backward(dy if y.dtype == dy.dtype else dy.to(y.dtype))
        return fn

    def eval_forward(m):
        def fn():
            with torch.no_grad(), amp:
                m(x)
        return fn

    res = {k: {} for k in norms}
    for key, make in (('fwd', forward), ('fwdbwd', forward_backward)):
        med = common.interleaved_medians(
            {k: make(m) for k, m in norms.items()}, args.reps, timer)
        for k, t in med.items():
            res[k][key] = t * 1e3
    for m in norms.values():
        m.eval()
    med = common.interleaved_medians(
        {k: eval_forward(m) for k, m in norms.items()}, args.reps, timer)
    for k, t in med.items():
        res[k]['eval'] = t * 1e3
    in_bytes = x.numel() * x.element_size()
    for k, m in norms.items():
        m.train()
        try:
            with amp:
                res[k]['mem'] = common.saved_bytes(lambda: m(x)) / in_bytes
        except Exception:  # saved-tensor hooks under torch.compile
            res[k]['mem'] = float('nan')
        res[k]['peak'] = peak_bytes(device, forward_backward(m)) / in_bytes
    if compile_it:
        torch._dynamo.reset()
    return res


def fmt(v: float) -> str:
    if v != v:
        return 'n/a'
    return f'{v:.3g}' if v < 100 else f'{v:.0f}'


def ratio(r, key, a, b) -> float:
    if a not in r or b not in r:
        return float('nan')
    return r[a][key] / r[b][key]


def shape_tables(report, rows, dtype):
    report(f'### Per layer, {_name(dtype)} (ms, median; ratios of mmsn SN)'
           '\n')
    for key, title in (('fwdbwd', 'forward+backward'),
                       ('fwd', 'training forward'),
                       ('eval', 'eval forward (running statistics)')):
        report(f'{title}:\n')
        report('| shape (N, C, H, W) | ' +
               ' | '.join(LABELS[k] for k in IMPLS) +
               ' | SN/BN | SN/GN | SN/compiled | authors\'/BN |')
        report('|---' * (len(IMPLS) + 5) + '|')
        for (n, c, hw), r in rows:
            cells = [fmt(r[k][key]) if k in r else '-' for k in IMPLS]
            report(f'| {n}, {c}, {hw}, {hw} | ' + ' | '.join(cells) +
                   f' | {fmt(ratio(r, key, "SN", "BN"))} | '
                   f'{fmt(ratio(r, key, "SN", "GN"))} | '
                   f'{fmt(ratio(r, key, "SN", "cSN"))} | '
                   f'{fmt(ratio(r, key, "refSN", "BN"))} |')
        report()
    report('Memory in units of the input: kept alive for backward (saved '
           'tensors, the input included) / peak allocated during '
           'forward+backward:\n')
    report('| shape | ' + ' | '.join(LABELS[k] for k in IMPLS) + ' |')
    report('|---' * (len(IMPLS) + 1) + '|')
    for (n, c, hw), r in rows:
        report(f'| {n}, {c}, {hw}, {hw} | ' + ' | '.join(
            f'{fmt(r[k]["mem"])} / {fmt(r[k]["peak"])}' if k in r else '-'
            for k in IMPLS) + ' |')
    report()


def median_ratio(rows, key, a, b) -> float:
    vals = [ratio(r, key, a, b) for _, r in rows]
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else float('nan')


def summary(report, rows, dtype):
    report(f'### Summary, {_name(dtype)} (median over shapes)\n')
    report('| ratio | median |')
    report('|---|---|')
    for label, key, a, b in (
            ('SN / BN, forward+backward', 'fwdbwd', 'SN', 'BN'),
            ('SN / GN(32), forward+backward', 'fwdbwd', 'SN', 'GN'),
            ('SN / compiled SN, forward+backward', 'fwdbwd', 'SN', 'cSN'),
            ('compiled SN / BN, forward+backward', 'fwdbwd', 'cSN', 'BN'),
            ('authors\' SN / BN, forward+backward', 'fwdbwd', 'refSN', 'BN'),
            ('SN / BN, training forward', 'fwd', 'SN', 'BN'),
            ('SN / BN, eval forward', 'eval', 'SN', 'BN'),
            ('SN / compiled SN, eval forward', 'eval', 'SN', 'cSN')):
        report(f'| {label} | {fmt(median_ratio(rows, key, a, b))} |')
    worst = max(r['SN']['mem'] for _, r in rows)
    report(f'| SN memory for backward / input (max) | {worst:.3f} |')
    report()


def bench_resnet50(common, report, args, dtype, device, timer):
    batch = args.resnet_batch
    models, train_step, eval_forward = common.resnet50_steps(
        device, dtype, batch)
    for m in models.values():
        m.train()
    train = common.interleaved_medians({k: train_step(k) for k in models},
                                       args.resnet_reps, timer, warmup=3)
    peak = {k: peak_bytes(device, train_step(k)) / 2**30 for k in models}
    for m in models.values():
        m.eval()
    evals = common.interleaved_medians({k: eval_forward(k) for k in models},
                                       args.resnet_reps, timer, warmup=2)
    label = 'bf16 AMP' if dtype == torch.bfloat16 else _name(dtype)
    report(f'### ResNet-50 (mmpretrain), batch {batch}, 224x224, {label}\n')
    report('| | BN | SN | SN / BN |')
    report('|---|---|---|---|')
    for name, t in (('training step, ms', train), ('eval forward, ms', evals)):
        report(f'| {name} | {t["BN"] * 1e3:.1f} | {t["SN"] * 1e3:.1f} | '
               f'{t["SN"] / t["BN"]:.3f} |')
    report(f'| training, images/s | {batch / train["BN"]:.0f} | '
           f'{batch / train["SN"]:.0f} | {train["BN"] / train["SN"]:.3f} |')
    report(f'| training step, peak GiB beyond the models | '
           f'{fmt(peak["BN"])} | {fmt(peak["SN"])} | '
           f'{fmt(peak["SN"] / peak["BN"])} |')
    report()
    return train['SN'] / train['BN']


def bench_triton_passes(common, report, args, shapes, device, timer):
    """mmsn's Triton kernels pass by pass against cuDNN's BN kernels."""
    try:
        tb = importlib.import_module('mmsn.ops.backends.triton')
    except ImportError as exc:
        report(f'(Triton backend not importable: {exc})\n')
        return
    if device.type == 'cpu' and not tb.kernels_interpreted():
        report('(Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU)'
               '\n')
        return
    report('### Triton kernels pass by pass vs cuDNN BN (ms; GB/s over the '
           'bytes each must move), float32\n')
    report('| shape | tile | moments (1R) | normalize (1R 1W) | eval sweep '
           '(1R 1W) | backward (4R 1W) | BN fwd (2R 1W) | BN bwd (4R 1W) | '
           'BN eval (1R 1W) |')
    report('|---|---|---|---|---|---|---|---|---|')
    eps = 1e-5
    for n, c, hw in shapes:
        torch.manual_seed(0)
        x4 = torch.randn(n, c, hw, hw, device=device, requires_grad=True)
        x3 = x4.detach().view(n, c, -1)
        dy = torch.randn_like(x3)
        ones = torch.ones(c, device=device)
        share = torch.full((3, ), 1 / 3, device=device)
        bn = nn.BatchNorm2d(c).to(device)
        bn_eval = nn.BatchNorm2d(c).to(device).eval()
        y_bn = bn(x4)
        size = x3.numel() * x3.element_size()
        for tile in args.triton_tiles:
            backend = tb.TritonBackend(tile=tile)
            mean, var, _ = backend.moments(x3, 1)
            mean_bn, var_bn = mean.mean(0), var.mean(0)
            med = common.interleaved_medians({
                'moments': lambda: backend.moments(x3, 1),
                'normalize': lambda: backend.sn_normalize(
                    x3, mean, var, ones, ones, share, share, mean_bn, var_bn,
                    eps),
                'sweep': lambda: backend.sn_forward_fixed(
                    x3, ones, ones, share, share, mean_bn, var_bn, eps, 1),
                'backward': lambda: backend.sn_backward(
                    dy, x3, mean, var, ones, share, share, mean_bn, var_bn,
                    True, eps, 1, True),
                'bn_fwd': lambda: bn(x4),
                'bn_bwd': lambda: torch.autograd.grad(
                    y_bn, x4, dy.view_as(x4), retain_graph=True),
                'bn_eval': lambda: bn_eval(x4.detach()),
            }, args.reps, timer)

            def cell(key, tensors):
                t = med[key]
                return f'{t * 1e3:.3g} ({tensors * size / t / 1e9:.0f})'

            report(f'| {n}, {c}, {hw}, {hw} | {tile} | {cell("moments", 1)} '
                   f'| {cell("normalize", 2)} | {cell("sweep", 2)} | '
                   f'{cell("backward", 5)} | {cell("bn_fwd", 3)} | '
                   f'{cell("bn_bwd", 5)} | {cell("bn_eval", 2)} |')
    report()


def targets(report, results, step_ratios):
    def check(value, goal, below=True):
        if value != value:
            return 'not measured'
        return 'met' if (value <= goal if below else value < goal) \
            else 'missed'

    report('### Targets (issue 10), ratios measured in this run\n')
    report('| target | measured | goal | |')
    report('|---|---|---|---|')
    for dtype, rows in results.items():
        d = _name(dtype)
        for label, key, a, b, goal in (
                (f'SN / BN forward+backward, median ({d})', 'fwdbwd', 'SN',
                 'BN', 1.15),
                (f'SN / BN eval forward, median ({d})', 'eval', 'SN', 'BN',
                 1.3)):
            v = median_ratio(rows, key, a, b)
            report(f'| {label} | {fmt(v)} | <= {goal} | {check(v, goal)} |')
        v = median_ratio(rows, 'fwdbwd', 'SN', 'cSN')
        report(f'| SN / compiled composite SN, forward+backward, median over '
               f'compiled shapes ({d}) | {fmt(v)} | < 1 | '
               f'{check(v, 1.0, below=False)} |')
        v = max(r['SN']['mem'] for _, r in rows)
        report(f'| SN memory kept for backward / input, max ({d}) | '
               f'{v:.3f} | <= 1.05 | {check(v, 1.05)} |')
    for dtype, v in step_ratios.items():
        label = 'bf16 AMP' if dtype == torch.bfloat16 else _name(dtype)
        report(f'| ResNet-50 training step SN / BN ({label}) | {fmt(v)} | '
               f'<= 1.10 | {check(v, 1.10)} |')
    report()


def header(report, args, shapes, device):
    try:
        import triton
        versions = f'triton {triton.__version__}'
    except ImportError:
        versions = 'no triton'
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        card = (f'{props.name} ({props.multi_processor_count} SMs, '
                f'{props.total_memory / 2**30:.0f} GiB)')
        versions += (f', CUDA {torch.version.cuda}, cuDNN '
                     f'{torch.backends.cudnn.version()}')
    else:
        card = f'{device} (a dry run of the GPU report)'
    path = args.sn_path or f'mmsn\'s default for {device.type} tensors'
    report(f'## Norm layers on {card}, torch {torch.__version__}, '
           f'{versions}\n')
    compiled = ('none' if args.compile_every <= 0 else 'all' if
                args.compile_every == 1 else
                f'every {args.compile_every}th, from the first')
    timing = ('CUDA events, L2 evicted before each call'
              if device.type == 'cuda' else 'wall clock')
    report(f'mmsn SN path: {path}. {args.reps} interleaved repetitions per '
           f'layer, {args.resnet_reps} per ResNet-50 step; {timing}; '
           f'{len(shapes)} shapes, torch.compile (default mode) of the '
           f'composite path on {compiled}.\n')


def run(args, common) -> None:
    """The whole GPU report (``common`` is benchmark_norm, for its shared
    helpers)."""
    torch._dynamo.config.cache_size_limit = max(
        64, torch._dynamo.config.cache_size_limit)
    report = Report(args.output, append=args.part == 'rest')
    device = torch.device(args.device)
    timer = CudaTimer(device) if device.type == 'cuda' else \
        common.Timer(device)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(',')) for s in args.shapes]
    elif args.quick:
        shapes = common.QUICK_SHAPES
    else:
        shapes = [(n, c, hw) for n in args.batches
                  for c, hw, _ in common.RESNET50_NORM_SHAPES]
    dtypes = [args.dtype] if args.dtype else [torch.float32, torch.bfloat16]
    with force_sn_path(args.sn_path):
        if args.part != 'rest':
            header(report, args, shapes, device)
            benchmark_host_toll.run(common, report, args, device, timer)
        if args.part == 'host-toll':
            report.close()
            return
        results = {}
        for dtype in dtypes:
            rows = []
            for i, shape in enumerate(shapes):
                print(f'[{_name(dtype)} {i + 1}/{len(shapes)}] {shape}',
                      file=sys.stderr, flush=True)
                compile_it = args.compile_every > 0 and \
                    i % args.compile_every == 0
                try:
                    res = bench_shape(common, shape, dtype, args, device,
                                      timer, compile_it)
                except Exception as exc:
                    if not compile_it:
                        raise
                    # a failed compile costs the column, not the run
                    report(f'(torch.compile failed on {shape}: '
                           f'{type(exc).__name__}: {exc})\n')
                    torch._dynamo.reset()
                    res = bench_shape(common, shape, dtype, args, device,
                                      timer, False)
                rows.append((shape, res))
            results[dtype] = rows
            shape_tables(report, rows, dtype)
            summary(report, rows, dtype)
        step_ratios: Dict[torch.dtype, float] = {}
        if not args.skip_resnet:
            for dtype in dtypes:
                print(f'[ResNet-50 {_name(dtype)}]', file=sys.stderr,
                      flush=True)
                try:
                    step_ratios[dtype] = bench_resnet50(
                        common, report, args, dtype, device, timer)
                except Exception as exc:  # report the rest regardless
                    report(f'(ResNet-50, {_name(dtype)}, failed: '
                           f'{type(exc).__name__}: {exc})\n')
                    step_ratios[dtype] = float('nan')
        targets(report, results, step_ratios)
        # tuning information last: a run cut short loses it first
        if args.triton_tiles:
            bench_triton_passes(common, report, args,
                                shapes if args.shapes else common.QUICK_SHAPES,
                                device, timer)
    report.close()
