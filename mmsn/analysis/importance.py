"""What SN learned: the IN/LN/BN shares of every SN layer of a model.

Shared by ``tools/analysis/plot_importance.py`` (table, CSV and a figure like
the paper's) and :class:`mmsn.engine.SNImportanceLoggerHook` (scalars during
training). SSN layers are included with their SparsestMax shares; once they
are one-hot, :attr:`LayerImportance.picks` names the norm each one picked.
"""
import csv
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mmengine.model import is_model_wrapper
from torch import nn

from mmsn.models.norms.sparse_switchable_norm import _SparseSwitchableNorm
from mmsn.models.norms.switchable_norm import _SwitchableNorm

#: The authors' advice: above this BN share, use batch average.
BN_SHARE_THRESHOLD = 0.3
BRANCHES = ('IN', 'LN', 'BN')


@dataclass
class LayerImportance:
    """Softmax shares of one SN layer.

    Args:
        name (str): Module name in the model, e.g. ``backbone.layer1.0.sn1``.
        mean (tuple[float]): Shares of the means, ordered [IN, LN(, BN)].
        var (tuple[float]): Shares of the variances, same order.
        moving_average (bool): Whether the running statistics are a moving
            average (as opposed to the authors' batch average).
        sparse (bool): An SSN layer (SparsestMax shares).
    """
    name: str
    mean: Tuple[float, ...]
    var: Tuple[float, ...]
    moving_average: bool = True
    sparse: bool = False

    @property
    def branches(self) -> Tuple[str, ...]:
        return BRANCHES[:len(self.mean)]

    @property
    def using_bn(self) -> bool:
        return len(self.mean) == 3

    @property
    def bn_share(self) -> Optional[float]:
        """The larger BN share of the mean and the variance (None: no BN).
        """
        return max(self.mean[2], self.var[2]) if self.using_bn else None

    @property
    def picks(self) -> Tuple[Optional[str], Optional[str]]:
        """The branch of the mean and of the variance where the shares are
        one-hot (SSN after its schedule), else None."""
        def pick(shares):
            nonzero = [b for b, share in zip(self.branches, shares) if share]
            return nonzero[0] if len(nonzero) == 1 else None

        return pick(self.mean), pick(self.var)

    def should_use_batch_average(self,
                                 threshold: float = BN_SHARE_THRESHOLD
                                 ) -> bool:
        """An SN layer with moving averages that leans on BN (share >
        threshold). SSN layers are not flagged: SSN's recipe uses moving
        averages."""
        return (self.moving_average and self.using_bn and not self.sparse
                and self.bn_share > threshold)


def collect_importance(model: nn.Module) -> List[LayerImportance]:
    """Shares of every SN layer of ``model``, in module order.

    Args:
        model (nn.Module): Any model, optionally in a DDP-style wrapper.
    """
    if is_model_wrapper(model):
        model = model.module
    records = []
    for name, module in model.named_modules():
        if isinstance(module, _SwitchableNorm):
            mean, var = module.importance()
            records.append(
                LayerImportance(
                    name=name,
                    mean=tuple(float(v) for v in mean),
                    var=tuple(float(v) for v in var),
                    moving_average=bool(module.moving_average),
                    sparse=isinstance(module, _SparseSwitchableNorm)))
    return records


def flagged_layers(records: Sequence[LayerImportance],
                   threshold: float = BN_SHARE_THRESHOLD
                   ) -> List[LayerImportance]:
    """Layers where the authors advise batch average instead of EMA."""
    return [r for r in records if r.should_use_batch_average(threshold)]


def batch_average_advice(records: Sequence[LayerImportance],
                         threshold: float = BN_SHARE_THRESHOLD) -> str:
    """The SN authors' advice on ``records``, in sentences: which SN layers
    use moving averages with a BN share above ``threshold`` (they advise
    batch average there), or that none does. SSN layers are not checked
    (SSN's recipe keeps moving averages) and the text says so."""
    sn = [r for r in records if not r.sparse]
    ssn = len(records) - len(sn)
    lines = []
    flagged = flagged_layers(sn, threshold)
    if flagged:
        lines.append(
            f'{len(flagged)} of {len(sn)} SN layers use moving averages with '
            f'a BN share above {threshold:g}; the SN authors advise batch '
            f'average there (norm_cfg moving_average=False, statistics '
            f'filled by SNBatchAverageHook).')
    elif sn:
        lines.append(f'No moving-average SN layer has a BN share above '
                     f'{threshold:g}.')
    if ssn:
        lines.append(
            f'{ssn} SSN layer{"s are" if ssn > 1 else " is"} not checked '
            f'for that advice: SSN\'s recipe keeps moving averages, whatever '
            f'share BN gets.')
    return '\n'.join(lines)


def average_shares(records: Sequence[LayerImportance]
                   ) -> Dict[str, Tuple[float, ...]]:
    """Unweighted mean over layers of the mean and variance shares.

    Layers without a BN branch count in the IN and LN averages only.
    """
    out = {}
    for kind in ('mean', 'var'):
        shares = []
        for k in range(len(BRANCHES)):
            values = [getattr(r, kind)[k] for r in records
                      if len(getattr(r, kind)) > k]
            if values:
                shares.append(sum(values) / len(values))
        out[kind] = tuple(shares)
    return out


def importance_scalars(records: Sequence[LayerImportance],
                       prefix: str = 'sn_importance') -> Dict[str, float]:
    """Flat ``{tag: share}`` dict for visualizer backends.

    Tags are ``{prefix}/{layer}/{mean|var}_{in|ln|bn}`` per layer and
    ``{prefix}/avg/{mean|var}_{in|ln|bn}`` for the average over layers.
    """
    scalars = {}
    for r in records:
        for kind in ('mean', 'var'):
            for branch, share in zip(r.branches, getattr(r, kind)):
                scalars[f'{prefix}/{r.name}/{kind}_{branch.lower()}'] = share
    for kind, shares in average_shares(records).items():
        for branch, share in zip(BRANCHES, shares):
            scalars[f'{prefix}/avg/{kind}_{branch.lower()}'] = share
    return scalars


def format_table(records: Sequence[LayerImportance],
                 threshold: float = BN_SHARE_THRESHOLD) -> str:
    """A fixed-width table, one row per layer; flagged rows end in ``<-``.
    """
    width = max([len('layer')] + [len(r.name) for r in records])
    sparse = any(r.sparse for r in records)
    header = (f'{"#":>3}  {"layer":<{width}}  ' +
              '  '.join(f'mean_{b:<2}' for b in BRANCHES) + '  ' +
              '  '.join(f'var_{b:<2} ' for b in BRANCHES) + '  EMA' +
              ('  picked' if sparse else ''))
    lines = [header, '-' * len(header)]

    def cells(shares):
        padded = list(shares) + [None] * (3 - len(shares))
        return '  '.join('      -' if s is None else f'{s:7.3f}'
                         for s in padded)

    for i, r in enumerate(records):
        flag = '  <- BN share > {:.2f}: use batch average'.format(threshold) \
            if r.should_use_batch_average(threshold) else ''
        ema = 'yes' if r.moving_average else 'no'
        picked = ''
        if sparse:
            picked = '  ' + '/'.join(p or '-' for p in r.picks)
        lines.append(f'{i:>3}  {r.name:<{width}}  {cells(r.mean)}  '
                     f'{cells(r.var)}  {ema:>3}{picked}{flag}')
    avg = average_shares(records)
    lines.append('-' * len(header))
    lines.append(f'{"":>3}  {"average":<{width}}  {cells(avg["mean"])}  '
                 f'{cells(avg["var"])}')
    return '\n'.join(lines)


def format_picks(records: Sequence[LayerImportance]) -> str:
    """A markdown table of the norm each layer picked for its mean and its
    variance ('-' where the shares are not one-hot)."""
    lines = ['| # | layer | mean | variance |', '|---|---|---|---|']
    for i, r in enumerate(records):
        mean, var = (p or '-' for p in r.picks)
        lines.append(f'| {i} | {r.name} | {mean} | {var} |')
    return '\n'.join(lines)


def write_csv(records: Sequence[LayerImportance],
              path: str,
              threshold: float = BN_SHARE_THRESHOLD) -> None:
    """One row per layer: shares (empty BN cells without a BN branch),
    the moving-average mode and the batch-average flag."""
    fields = ['index', 'layer'] + [f'mean_{b.lower()}' for b in BRANCHES] + \
        [f'var_{b.lower()}' for b in BRANCHES] + \
        ['moving_average', 'use_batch_average']
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for i, r in enumerate(records):
            pad = [''] * (3 - len(r.mean))
            writer.writerow([i, r.name] +
                            [f'{s:.6f}' for s in r.mean] + pad +
                            [f'{s:.6f}' for s in r.var] + pad +
                            [int(r.moving_average),
                             int(r.should_use_batch_average(threshold))])


def plot_importance(records: Sequence[LayerImportance],
                    out_file: str,
                    title: Optional[str] = None,
                    threshold: float = BN_SHARE_THRESHOLD) -> None:
    """Stacked bars of the IN/LN/BN shares, means on top, variances below.

    Layers flagged by :func:`flagged_layers` get a red ``*`` above their
    bars.
    """
    if not records:
        raise ValueError('The model has no SN layer to plot')
    import matplotlib
    matplotlib.use('Agg')  # files only; no display needed
    import matplotlib.pyplot as plt

    n = len(records)
    colors = {'IN': '#4c72b0', 'LN': '#dd8452', 'BN': '#55a868'}
    fig, axes = plt.subplots(
        2, 1, figsize=(max(8.0, 0.22 * n + 2), 7.5), sharex=True)
    xs = list(range(n))
    for ax, kind in zip(axes, ('mean', 'var')):
        bottom = [0.0] * n
        for k, branch in enumerate(BRANCHES):
            heights = [
                getattr(r, kind)[k] if len(getattr(r, kind)) > k else 0.0
                for r in records
            ]
            if not any(heights) and k == 2:
                continue  # no layer has a BN branch
            ax.bar(xs, heights, bottom=bottom, width=0.8,
                   color=colors[branch], label=branch)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for i, r in enumerate(records):
            if r.should_use_batch_average(threshold):
                ax.text(i, 1.01, '*', color='red', ha='center', va='bottom',
                        fontsize=12)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel('share of the ' +
                      ('means' if kind == 'mean' else 'variances'))
        ax.axhline(1.0, color='black', linewidth=0.5)
        ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)
    labels = [r.name.replace('backbone.', '') for r in records]
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(labels, rotation=90,
                            fontsize=7 if n <= 30 else 5)
    axes[1].set_xlabel('SN layer (forward order)')
    flagged = len(flagged_layers(records, threshold))
    suffix = (f'; * BN share > {threshold:g} with moving average '
              f'({flagged} layers)') if flagged else ''
    axes[0].set_title((title or 'Switchable Normalization importance') +
                      suffix, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)


__all__ = [
    'BN_SHARE_THRESHOLD', 'LayerImportance', 'collect_importance',
    'flagged_layers', 'batch_average_advice', 'average_shares',
    'importance_scalars', 'format_table', 'format_picks', 'write_csv',
    'plot_importance'
]
