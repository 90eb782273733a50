"""Plot the IN/LN/BN importance shares that the SN (or SSN) layers of a model
learned.

Example::

    python tools/analysis/plot_importance.py \\
        configs/resnet50_sn_8xb32.py checkpoints/resnet50_sn_8xb32.pth \\
        --out work_dirs/resnet50_sn_importance.png

Writes the figure (stacked bars of the shares of the means and of the
variances for every SN layer, in order), a CSV next to it (or ``--csv``) and
prints a table. Layers that use moving averages and give BN a share above
``--threshold`` (0.3) are flagged: there the SN authors advise batch average.
For SSN layers the table says which norm each one picked for its mean and its
variance (``--picks FILE`` also writes them as a markdown table).
"""
import argparse
import os
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Plot the learned importance shares of SN layers')
    parser.add_argument(
        'config',
        help='config of the model: a path, or the file name of one of '
        'mmsn\'s configs')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        help='checkpoint to load (omit to inspect the initial shares)')
    parser.add_argument(
        '--out', required=True, help='output figure (.png, .pdf, .svg)')
    parser.add_argument(
        '--csv', help='output table (defaults to --out with .csv)')
    parser.add_argument(
        '--threshold',
        type=float,
        default=0.3,
        help='BN share above which a moving-average layer is flagged')
    parser.add_argument('--title', help='figure title')
    parser.add_argument(
        '--picks',
        help='write the norm each layer picked (SSN) as a markdown table')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import mmsn  # noqa: F401  (registers SN, backbones, safe loading)
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS

    from mmsn.analysis import (batch_average_advice, collect_importance,
                               format_picks, format_table, plot_importance,
                               write_csv)
    from mmsn.utils.tool_setup import find_config

    cfg = Config.fromfile(find_config(args.config))
    with DefaultScope.overwrite_default_scope(
            cfg.get('default_scope', 'mmpretrain')):
        model = MODELS.build(cfg.model)
    if args.checkpoint:
        # Shares are parameters: a checkpoint that misses them would plot
        # the initial 1/3 silently, so missing keys are an error.
        load_checkpoint(model, args.checkpoint, map_location='cpu',
                        strict=True, logger='silent')
    records = collect_importance(model)
    if not records:
        print(f'error: the model of {args.config} has no SN layer',
              file=sys.stderr)
        return 1

    out_dir = osp.dirname(osp.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    csv_file = args.csv or osp.splitext(args.out)[0] + '.csv'
    title = args.title or osp.basename(
        args.checkpoint or f'{args.config} (initial)')
    plot_importance(records, args.out, title=title,
                    threshold=args.threshold)
    write_csv(records, csv_file, threshold=args.threshold)

    print(format_table(records, args.threshold))
    print('\n' + batch_average_advice(records, args.threshold))
    print(f'Figure: {args.out}\nTable: {csv_file}')
    if args.picks:
        with open(args.picks, 'w') as f:
            f.write(format_picks(records) + '\n')
        print(f'Picks: {args.picks}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
