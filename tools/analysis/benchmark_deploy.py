"""Eval forward time of a collapsed SSN ResNet-50 next to a plain BN ResNet-50.

The model of ``configs/resnet50_ssn_8xb32.py`` gets one-hot picks on every
SSN layer (all BN/BN, or a random mix of the nine mean/variance
combinations) and is collapsed in memory with :func:`mmsn.deploy.
collapse_model`, as ``tools/deploy/collapse_norms.py`` does. The same
network with ``norm_cfg=dict(type='BN')`` is the baseline, unfused and with
mmcv's ``fuse_conv_bn``; the collapsed model is timed as written and with
its BN/BN layers folded the same way (``mmsn_runtime.expose_batch_norms``).
The uncollapsed SSN model is timed for reference. All variants run
interleaved in one process (each repetition runs every variant once, in
rotating order) and the median is reported, with ratios to BN, next to
the minimum (less disturbed by other load on a shared machine).

Usage::

    python tools/analysis/benchmark_deploy.py                  # both picks
    python tools/analysis/benchmark_deploy.py --picks bn --batch 8 --reps 20
    python tools/analysis/benchmark_deploy.py --device cuda
"""
import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmsn  # noqa: F401  (registers SSN and the configs' types)
from mmsn.deploy import collapse_model
from mmsn.models.norms.sparse_switchable_norm import _SparseSwitchableNorm
from mmsn_runtime import expose_batch_norms

CONFIG = 'configs/resnet50_ssn_8xb32.py'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--picks', choices=['bn', 'mixed', 'both'],
                        default='both')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--reps', type=int, default=9)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int,
                        help='torch intra-op threads (CPU)')
    return parser.parse_args()


def build(norm_cfg, device):
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(CONFIG)
    cfg.model.backbone.norm_cfg = norm_cfg
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    return model.to(device).eval()


def set_picks(model, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = {}
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _SparseSwitchableNorm):
                continue
            picks = (2, 2) if mode == 'bn' else tuple(
                torch.randint(3, (2, ), generator=gen).tolist())
            for param, flag, pick in ((m.mean_weight, m.mean_fixed, picks[0]),
                                      (m.var_weight, m.var_fixed, picks[1])):
                param.copy_(F.one_hot(torch.tensor(pick), 3))
                flag.fill_(1)
            m.running_var.fill_(1.0)
            counts[picks] = counts.get(picks, 0) + 1
    return counts


def interleaved_medians(fns, reps, sync):
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(ts) for name, ts in times.items()},
            {name: min(ts) for name, ts in times.items()})


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: 0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    bn = build(dict(type='BN'), device)
    variants = {'BN': bn, 'BN, fused': fuse_conv_bn(copy.deepcopy(bn))}
    summary = []
    for mode in (('bn', 'mixed') if args.picks == 'both' else
                 (args.picks, )):
        ssn = build(dict(type='SSN'), device)
        counts = set_picks(ssn, mode)
        collapsed = copy.deepcopy(ssn)
        collapse_model(collapsed)
        folded = fuse_conv_bn(expose_batch_norms(copy.deepcopy(collapsed)))
        with torch.no_grad():
            err = (collapsed(x, mode='tensor') -
                   ssn(x, mode='tensor')).abs().max().item()
        variants[f'collapsed ({mode})'] = collapsed
        variants[f'collapsed ({mode}), BN/BN folded'] = folded
        variants[f'SSN, not collapsed ({mode})'] = ssn
        summary.append(f'{mode}: {sum(counts.values())} layers, picks '
                       f'(mean, var) -> count '
                       f'{dict(sorted(counts.items()))}; max |logit '
                       f'change| from collapsing {err:.2g}')

    def run(model):
        def fn():
            with torch.no_grad():
                model(x, mode='tensor')
        return fn

    medians, minima = interleaved_medians(
        {k: run(m) for k, m in variants.items()}, args.reps, sync)
    print(f'ResNet-50 eval forward, batch {args.batch}x3x{args.size}x'
          f'{args.size}, {args.device} ({platform.processor() or "?"}, '
          f'{torch.get_num_threads()} threads), torch {torch.__version__}, '
          f'median of {args.reps} interleaved runs')
    print('(picks: IN=0, LN=1, BN=2)')
    for line in summary:
        print('  ' + line)
    print('\n| model | median ms | / BN | / BN fused | min ms | / BN (min) '
          '|\n|---|---|---|---|---|---|')
    base, fused = medians['BN'], medians['BN, fused']
    for name, t in medians.items():
        print(f'| {name} | {t * 1e3:.1f} | {t / base:.3f} | '
              f'{t / fused:.3f} | {minima[name] * 1e3:.1f} | '
              f'{minima[name] / minima["BN"]:.3f} |')


if __name__ == '__main__':
    main()
