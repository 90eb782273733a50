"""The host path section of benchmark_norm.py: what an SN call costs the
host, where the tensors are too small for the arithmetic to matter.

* per layer (tiny 2x8x2x2 input, one thread): dispatched operators and
  host syncs (counted, mmsn.analysis.host_path) and host time, against
  BatchNorm, for a training step (forward + backward) and an eval forward;
* a whole host-bound network: mmpretrain's ResNet-50 at 2x3x32x32, one
  thread, with BN, SN and SSN;
* torch.compile of a ResNet-50 step with SN (traced as plain ops, the
  default, and as the opaque layer operators) against BN's.
"""
import contextlib
import sys
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

import mmsn
from mmsn.analysis.host_path import (host_times, layer_call, layer_costs,
                                     share_convolutions)
from mmsn.ops import compile_with_layer_ops


def _ssn(cls):
    def make(c):
        layer = cls(c)
        layer.radius.fill_(0.3)  # mid-schedule: no vector frozen yet
        return layer
    return make


# (label, layer factory, input shape, BN class)
LAYERS = [
    ('SN2d', mmsn.SwitchableNorm2d, (2, 8, 2, 2), nn.BatchNorm2d),
    ('SN1d (N, C, L)', mmsn.SwitchableNorm1d, (2, 8, 4), nn.BatchNorm1d),
    ('SN3d', mmsn.SwitchableNorm3d, (2, 8, 2, 2, 1), nn.BatchNorm3d),
    ('SN2d momentum=None', lambda c: mmsn.SwitchableNorm2d(c, momentum=None),
     (2, 8, 2, 2), nn.BatchNorm2d),
    ('SN2d moving_average=False',
     lambda c: mmsn.SwitchableNorm2d(c, moving_average=False), (2, 8, 2, 2),
     nn.BatchNorm2d),
    ('SN2d using_bn=False', lambda c: mmsn.SwitchableNorm2d(c, using_bn=False),
     (2, 8, 2, 2), nn.BatchNorm2d),
    ('SSN2d', _ssn(mmsn.SparseSwitchableNorm2d), (2, 8, 2, 2),
     nn.BatchNorm2d),
]


def bench_layers(reps: int) -> None:
    print('\n### Host path per layer call (input 2x8x2x2 or alike, one '
          'thread)\n')
    print('Dispatched operators and host syncs (`aten._local_scalar_dense`) '
          'per training step (forward + backward of `y.sum()`) and per eval '
          'forward, counted with a TorchDispatchMode; host time per call, '
          f'median of {reps} interleaved rounds of 200 calls.\n')
    print('| layer | train ops / syncs | BN | eval ops / syncs | BN | '
          'train us | / BN | eval us | / BN |')
    print('|---|---|---|---|---|---|---|---|---|')
    results = {}
    for label, make, shape, bn_cls in LAYERS:
        x = torch.randn(shape)
        row = []
        for train in (True, False):
            ops, syncs, _ = layer_costs(make(8), x, train)
            bn_ops, bn_syncs, _ = layer_costs(bn_cls(8), x, train)
            row += [f'{ops} / {syncs}', f'{bn_ops} / {bn_syncs}']
        times, ratios = [], []
        for train in (True, False):
            layers = {'BN': bn_cls(8).train(train),
                      'SN': make(8).train(train)}
            t = host_times({k: layer_call(m, x, train)
                            for k, m in layers.items()}, reps=reps)
            times += [f'{t["SN"]:.1f}', f'{t["SN"] / t["BN"]:.2f}']
            ratios.append(t['SN'] / t['BN'])
        results[label] = ratios
        print(f'| {label} | ' + ' | '.join(row + times) + ' |')
    return results


class _Classifier(nn.Module):

    def __init__(self, norm: str):
        super().__init__()
        from mmpretrain.models import ResNet
        self.backbone = ResNet(depth=50, norm_cfg=dict(type=norm))
        self.fc = nn.Linear(2048, 10)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def _resnet_calls(norms, x, train: bool):
    calls = {}
    target = torch.zeros(x.shape[0], dtype=torch.long)
    first = None
    for norm in norms:
        torch.manual_seed(0)
        model = _Classifier(norm).train(train)
        if first is None:
            first = model
        else:
            share_convolutions(model, first)
        if train:
            def step(model=model):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), target).backward()
        else:
            def step(model=model):
                with torch.no_grad():
                    model(x)
        calls[norm] = step
    return calls


def bench_host_bound_resnet(reps: int) -> None:
    """ResNet-50 at 2x3x32x32 on one thread: the per-layer host cost
    decides the step time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(2, 3, 32, 32)
        print('\n### Host-bound ResNet-50 (mmpretrain, input 2x3x32x32, '
              f'one thread, ms, median of {reps} interleaved)\n')
        print('| | BN | SN | SSN | SN / BN | SSN / BN |')
        print('|---|---|---|---|---|---|')
        results = {}
        for train, label in ((True, 'training step (fwd + bwd)'),
                             (False, 'eval forward')):
            calls = _resnet_calls(('BN', 'SN', 'SSN'), x, train)
            t = host_times(calls, reps=reps, inner=1)
            results['train' if train else 'eval'] = t
            print(f'| {label} | {t["BN"] / 1e3:.1f} | {t["SN"] / 1e3:.1f} | '
                  f'{t["SSN"] / 1e3:.1f} | {t["SN"] / t["BN"]:.3f} | '
                  f'{t["SSN"] / t["BN"]:.3f} |')
    finally:
        torch.set_num_threads(threads)
    return results


def bench_compiled_resnet(batch: int, size: int, reps: int):
    """torch.compile of a ResNet-50 training step and eval forward: BN, SN
    traced as plain ops (inductor fuses them with their neighbours) and SN
    as the opaque layer operators. Each variant is compiled and timed in
    turn (a compiled graph is tied to how it was traced). Returns
    ``{label: {'train': us, 'eval': us, 'compile': s}}``."""
    import torch._dynamo
    x = torch.randn(batch, 3, size, size)
    target = torch.zeros(batch, dtype=torch.long)
    variants = {'BN': ('BN', False), 'SN (plain ops)': ('SN', False),
                'SN (layer operators)': ('SN', True)}
    print(f'\n### torch.compile, ResNet-50 (mmpretrain), batch {batch}, '
          f'{size}x{size} (ms, median of {reps}, variants one after the '
          'other; compile time of the first training step and eval forward '
          'in the last column)\n')
    print('| | training step | / BN | eval forward | / BN | compile s |')
    print('|---|---|---|---|---|---|')
    results: Dict[str, Dict[str, float]] = {}
    for label, (norm, opaque) in variants.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _Classifier(norm)
        compiled = torch.compile(model)

        def train_step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(compiled(x), target).backward()

        def eval_step():
            with torch.no_grad():
                compiled(x)

        context = compile_with_layer_ops(opaque) if norm == 'SN' \
            else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            model.train()
            train_step()
            model.eval()
            eval_step()
            compile_s = time.perf_counter() - start
            model.train()
            train = host_times({'t': train_step}, reps=reps, inner=1)['t']
            model.eval()
            evals = host_times({'e': eval_step}, reps=reps, inner=1)['e']
        results[label] = dict(train=train, eval=evals, compile=compile_s)
        print(f'[compile] {label} done', file=sys.stderr, flush=True)
    bn = results['BN']
    for label, r in results.items():
        print(f'| {label} | {r["train"] / 1e3:.1f} | '
              f'{r["train"] / bn["train"]:.3f} | {r["eval"] / 1e3:.1f} | '
              f'{r["eval"] / bn["eval"]:.3f} | {r["compile"]:.0f} |')
    return results


def run(args) -> dict:
    """The host sections; returns what the targets table needs."""
    out = {}
    if 'host' in args.sections:
        out['layers'] = bench_layers(args.host_reps)
        out['host_resnet'] = bench_host_bound_resnet(args.host_resnet_reps)
    if 'compile' in args.sections:
        out['compile'] = bench_compiled_resnet(
            args.compile_batch, args.compile_size, args.compile_reps)
    return out
