"""Collapse a trained SSN (or near one-hot SN) model into plain norms.

Example::

    python tools/deploy/collapse_norms.py \\
        configs/demo/resnet_ssn_digits.py work_dirs/demo_ssn/epoch_8.pth \\
        work_dirs/demo_ssn/deploy --batch dataset

Writes ``OUT_DIR/<config name>_collapsed.py`` and ``.pth``: every SSN layer
becomes the ``CollapsedNorm`` it picked (IN, LN or BN statistics for the
mean and for the variance; BN for both is a frozen affine map, foldable into
the conv before it with ``mmsn_runtime.expose_batch_norms`` and mmcv's
``fuse_conv_bn``). The written config imports ``mmsn_runtime``, not mmsn.
SN layers collapse only with ``--sn-tolerance T`` (every share within T of
one-hot). The largest change of the outputs on a batch is printed.

Every refusal (a missing, damaged or unfitting checkpoint, a config without
SN/SSN, layers that do not collapse, an output folder that cannot be
written) prints ``error: <reason>`` and ``Nothing was written.`` and exits
with 1. Files are written as ``<name>.<pid>.partial`` and moved into place
when complete; those of a killed run are removed by the next one.
"""
import argparse
import sys

from mmsn.deploy import CollapseError, collapse_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Collapse SSN/SN layers into the norms they picked')
    parser.add_argument(
        'config',
        help='config of the trained model: a path, or the file name of one '
        'of mmsn\'s configs')
    parser.add_argument('checkpoint', help='its checkpoint')
    parser.add_argument('out_dir', help='where to write the .py and .pth')
    parser.add_argument(
        '--sn-tolerance',
        type=float,
        help='also collapse SN layers (and unfinished SSN layers) whose '
        'shares are all within this of one-hot')
    parser.add_argument(
        '--batch',
        choices=['random', 'dataset'],
        default='random',
        help='compare the outputs on random inputs or on the first batch '
        'of the config\'s test dataloader')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument(
        '--input-shape',
        type=int,
        nargs='+',
        help='C H W of random inputs (default: the test pipeline\'s crop, '
        'else 224)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = collapse_checkpoint(
            args.config,
            args.checkpoint,
            args.out_dir,
            sn_tolerance=args.sn_tolerance,
            batch=args.batch,
            batch_size=args.batch_size,
            input_shape=args.input_shape)
    except CollapseError as err:
        print(f'error: {err}\nNothing was written.', file=sys.stderr)
        return 1
    width = max(len(p.name) for p in result['picks'])
    print(f'{"layer":<{width}}  kind  mean  var  distance from one-hot')
    for p in result['picks']:
        print(f'{p.name:<{width}}  {"SSN" if p.sparse else "SN ":<4}  '
              f'{p.mean:<4}  {p.var:<3}  {p.distance:.3g}')
    print(f'Largest change of the outputs on a {args.batch} batch of shape '
          f'{result["batch_shape"]}: {result["max_abs_change"]:.3g} '
          f'(relative to their largest magnitude: '
          f'{result["rel_change"]:.3g})')
    report = result['report']
    if report['model_needs_mmsn']:
        print('note: the model also uses mmsn types that mmsn_runtime has '
              'no plain version of, so the written config imports mmsn: ' +
              '; '.join(report['model_needs_mmsn']))
    if report['others_need_mmsn']:
        print('note: the model loads and runs without mmsn, but these parts '
              'of the config are mmsn\'s (add mmsn to custom_imports to use '
              'them, e.g. to evaluate with tools/test.py): ' +
              '; '.join(report['others_need_mmsn']))
    print(f'Config: {result["config"]}\nCheckpoint: {result["checkpoint"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
