"""What an SN layer costs the host and the launch queue, against BN (issue
17), for the GPU report (benchmark_norm_cuda.py), all measured in one run:

1. per layer, BN (cuDNN) and mmsn's SN side by side, training
   forward+backward and eval forward: device kernels launched
   (torch.profiler), of them Triton launches, ops dispatched
   (TorchDispatchMode, the layer operators counting one each), host reads
   of a value (``aten._local_scalar_dense``) and synchronising CUDA calls
   (``torch.cuda.set_sync_debug_mode``), and the host's time to issue one
   call;
2. where SN's host time goes, function by function (cProfile; the
   backward run on the calling thread so that the profiler sees it);
3. a ResNet-50 (mmpretrain) training step, BN and SN, eager and under
   ``torch.compile(mode='reduce-overhead')`` (SN traced as its layer
   operators, so that its Triton kernels run inside the CUDA graph).
"""
import contextlib
import importlib
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mmsn import SwitchableNorm2d
from mmsn.analysis.host_path import HOST_SYNC, count_dispatch, host_profile
from mmsn.ops.switchable_norm import compile_with_layer_ops, layer_ops_for

# (N, C, H=W): a mid-network ResNet-50 shape and a launch-bound one
LAYER_SHAPES = [(32, 256, 14), (8, 512, 7)]
NAN = float('nan')


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


@contextlib.contextmanager
def _triton_launches(counts):
    """Counts the launches of mmsn's Triton kernels into counts[0]."""
    try:
        launch = importlib.import_module('mmsn.ops.backends.triton_launch')
    except ImportError:
        yield
        return
    real = launch._launch

    def counting(*args, **kwargs):
        counts[0] += 1
        real(*args, **kwargs)

    launch._launch = counting
    try:
        yield
    finally:
        launch._launch = real


def device_work(fn, reps, device):
    """(kernels, memory copies and sets) run on the GPU per call."""
    if device.type != 'cuda':
        return NAN, NAN
    from torch.profiler import ProfilerActivity, profile
    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU,
                             ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    cuda = torch.autograd.DeviceType.CUDA
    names = [e.name for e in prof.events() if e.device_type == cuda]
    copies = sum(n.startswith(('Memcpy', 'Memset')) for n in names)
    return (len(names) - copies) / reps, copies / reps


def host_counts(fn, device):
    """(ops dispatched, host reads, synchronising CUDA calls, Triton
    launches) of one call."""
    launches = [0]
    syncs = NAN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('warn')
        try:
            with _triton_launches(launches):
                ops = count_dispatch(fn)
        finally:
            if device.type == 'cuda':
                torch.cuda.set_sync_debug_mode('default')
                syncs = sum('synchroniz' in str(w.message) for w in caught)
    return sum(ops.values()), ops[HOST_SYNC], syncs, launches[0]


def issue_us(fn, reps, device) -> float:
    """Host microseconds to issue one call (the GPU runs behind)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    _sync(device)
    return elapsed / reps * 1e6


def _layer_calls(shape, device):
    """{(mode, impl): fn} for one shape."""
    n, c, hw = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    calls = {}
    for impl, make in (('BN', nn.BatchNorm2d), ('SN', SwitchableNorm2d)):
        train, ev = make(c).to(device).train(), make(c).to(device).eval()
        params = list(train.parameters())

        def fwd_bwd(m=train, params=params):
            x.grad = None
            for p in params:
                p.grad = None
            m(x).backward(dy)

        def eval_fwd(m=ev):
            with torch.no_grad():
                m(x)

        calls[('fwdbwd', impl)] = fwd_bwd
        calls[('eval', impl)] = eval_fwd
    return calls, x


def _fmt(v, digits=3) -> str:
    if v != v:
        return 'n/a'
    return f'{v:.{digits}g}'


def _ratio(a, b) -> str:
    return _fmt(a / b) if b else 'n/a'


def layer_tables(report, args, device):
    reps = max(args.reps, 5)
    report('### Host toll per layer: SN vs BN (issue 17)\n')
    report('Per call, one layer, float32. Kernels: GPU kernels the '
           'profiler sees; copies: memory copies and sets (the layer\'s '
           'non-blocking read of its non-finite counter, say); Triton: of '
           'the kernels, mmsn\'s Triton launches; ops: ops dispatched (a '
           'layer operator counts one); reads: '
           '`aten._local_scalar_dense` (a value read by the host); syncs: '
           'synchronising CUDA calls; issue: host microseconds to issue '
           'the call.\n')
    report('| shape (N, C, H, W) | pass | kernels BN / SN (SN/BN) | copies '
           'BN / SN | Triton (SN) | ops BN / SN (SN/BN) | reads BN / SN | '
           'syncs BN / SN | issue us BN / SN (SN/BN) |')
    report('|---|---|---|---|---|---|---|---|---|')
    shapes = LAYER_SHAPES
    if args.shapes:  # a dry run's tiny shapes
        shapes = [tuple(int(v) for v in s.split(',')) for s in args.shapes]
    for shape in shapes:
        calls, x = _layer_calls(shape, device)
        path = 'layer operators' if layer_ops_for(x) is not None \
            else 'functional core'
        for mode, label in (('fwdbwd', 'train fwd+bwd'),
                            ('eval', 'eval fwd')):
            bn, sn = calls[(mode, 'BN')], calls[(mode, 'SN')]
            (k_bn, c_bn), (k_sn, c_sn) = (device_work(f, reps, device)
                                          for f in (bn, sn))
            h_bn, h_sn = host_counts(bn, device), host_counts(sn, device)
            t_bn, t_sn = (issue_us(f, reps, device) for f in (bn, sn))
            n, c, hw = shape
            report(f'| {n}, {c}, {hw}, {hw} | {label} | {_fmt(k_bn)} / '
                   f'{_fmt(k_sn)} ({_ratio(k_sn, k_bn)}) | {_fmt(c_bn)} / '
                   f'{_fmt(c_sn)} | {h_sn[3]} | '
                   f'{h_bn[0]} / {h_sn[0]} ({_ratio(h_sn[0], h_bn[0])}) | '
                   f'{h_bn[1]} / {h_sn[1]} | {_fmt(h_bn[2])} / '
                   f'{_fmt(h_sn[2])} | {t_bn:.0f} / {t_sn:.0f} '
                   f'({_ratio(t_sn, t_bn)}) |')
    report(f'\nmmsn SN ran through its {path}.\n')


def profile_tables(report, args, device):
    """SN's host time by function, training fwd+bwd and eval forward, at
    the first layer shape."""
    shape = LAYER_SHAPES[0]
    if args.shapes:
        shape = tuple(int(v) for v in args.shapes[0].split(','))
    calls, _ = _layer_calls(shape, device)
    n, c, hw = shape
    report(f'### Where SN\'s host time goes ({n}, {c}, {hw}, {hw}; '
           'cProfile)\n')
    report('Per call, the 12 functions with the most host time of their '
           'own (self) and with what they call (total), in microseconds, '
           'over 50 profiled calls. The profiler slows Python functions: '
           'compare shares, not these totals with the issue times above. '
           'Builtins (`<...>`) include the C++ they run, down to the next '
           'Python function.\n')
    for mode, label in (('fwdbwd', 'train fwd+bwd'), ('eval', 'eval fwd')):
        _sync(device)
        rows = host_profile(calls[(mode, 'SN')], reps=50)
        _sync(device)
        report(f'{label}:\n')
        report('| function | calls | self us | total us |')
        report('|---|---|---|---|')
        for r in rows:
            name = r.function.replace('|', '/')
            report(f'| `{name}` | {r.calls:.3g} | {r.self_us:.1f} | '
                   f'{r.total_us:.1f} |')
        report()


def _steps(common, args, device):
    """Training-step closures: BN and SN, eager and compiled."""
    batch = args.resnet_batch
    models, _, _ = common.resnet50_steps(device, torch.float32, batch)
    x = torch.randn(batch, 3, 224, 224, device=device)
    target = torch.randint(0, 1000, (batch, ), device=device)
    backend = args.compile_backend
    mode = 'reduce-overhead' if backend == 'inductor' else None
    steps = {}
    for norm, model in models.items():
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        compiled = torch.compile(model, backend=backend, mode=mode)
        for kind, net in (('eager', model), ('compiled', compiled)):
            # SN traced as its layer operators (opaque to inductor): its
            # Triton kernels run in the CUDA graph
            context = compile_with_layer_ops if (
                norm, kind) == ('SN', 'compiled') else contextlib.nullcontext

            def step(net=net, opt=opt, kind=kind, context=context):
                if kind == 'compiled' and mode == 'reduce-overhead':
                    torch.compiler.cudagraph_mark_step_begin()
                opt.zero_grad(set_to_none=True)
                with context():
                    loss = F.cross_entropy(net(x), target)
                loss.backward()
                opt.step()

            steps[(kind, norm)] = step
    return steps


def resnet_compiled(common, report, args, device, timer):
    batch = args.resnet_batch
    mode = ('torch.compile(mode=\'reduce-overhead\')'
            if args.compile_backend == 'inductor' else
            f'torch.compile(backend={args.compile_backend!r})')
    report(f'### ResNet-50 (mmpretrain) training step, batch {batch}, '
           f'float32: eager and {mode}\n')
    steps = _steps(common, args, device)
    eager = {k: f for k, f in steps.items() if k[0] == 'eager'}
    counts = {k: host_counts(f, device) for k, f in eager.items()}
    times = common.interleaved_medians(
        {k: f for k, f in eager.items()}, args.resnet_reps, timer, warmup=2)
    compiled = {k: f for k, f in steps.items() if k[0] == 'compiled'}
    failed = None
    try:
        times.update(common.interleaved_medians(
            compiled, args.resnet_reps, timer, warmup=3))
    except Exception as exc:  # report the eager half regardless
        failed = f'{type(exc).__name__}: {exc}'.splitlines()[0][:300]
    report('| | BN | SN | SN / BN |')
    report('|---|---|---|---|')
    rows = [('eager, ms', 'eager'), ('compiled, ms', 'compiled')]
    for label, kind in rows:
        t_bn = times.get((kind, 'BN'), NAN) * 1e3
        t_sn = times.get((kind, 'SN'), NAN) * 1e3
        report(f'| {label} | {_fmt(t_bn, 4)} | {_fmt(t_sn, 4)} | '
               f'{_ratio(t_sn, t_bn)} |')
    r = [times.get(('compiled', k), NAN) / times[('eager', k)]
         for k in ('BN', 'SN')]
    report(f'| compiled / eager | {_fmt(r[0])} | {_fmt(r[1])} | |')
    bn, sn = counts[('eager', 'BN')], counts[('eager', 'SN')]
    report(f'| ops dispatched per eager step | {bn[0]} | {sn[0]} | '
           f'{_ratio(sn[0], bn[0])} |')
    report(f'| host reads per eager step | {bn[1]} | {sn[1]} | |')
    report(f'| synchronising CUDA calls per eager step | {_fmt(bn[2])} | '
           f'{_fmt(sn[2])} | |')
    report(f'| Triton launches per eager step | {bn[3]} | {sn[3]} | |')
    report()
    if failed:
        report(f'(the compiled steps failed: {failed})\n')


def run(common, report, args, device, timer) -> None:
    """Both sections; each reports its own failure and lets the other run.
    """
    for section in (layer_tables, profile_tables, resnet_compiled):
        try:
            if section is not resnet_compiled:
                section(report, args, device)
            elif not args.skip_resnet:
                section(common, report, args, device, timer)
        except Exception as exc:
            report(f'({section.__name__} failed: {type(exc).__name__}: '
                   f'{exc})\n')
