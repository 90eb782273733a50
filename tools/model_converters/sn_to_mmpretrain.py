"""Convert a checkpoint of the SN authors' zoo to an mmpretrain checkpoint.

Example::

    python tools/model_converters/sn_to_mmpretrain.py \\
        resnet50v1_sn_best.pth.tar checkpoints/resnet50_sn_8xb32.pth

The source is the authors' ``{'epoch', 'model', 'state_dict', 'best_prec1',
'optimizer'}`` dict (ResNet v1/v2, depth 50/101, with or without the BN
branch). The result loads into the matching config of ``configs/`` with no
missing or unexpected keys; unknown keys, shape mismatches or an unknown
model stop the tool before anything is written.
"""
import argparse
import sys

from mmsn.converters import KNOWN_MODELS, ConversionError, convert_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an SN authors\' checkpoint to mmpretrain')
    parser.add_argument('src', help='the authors\' checkpoint (.pth.tar)')
    parser.add_argument('dst', help='output mmpretrain checkpoint (.pth)')
    parser.add_argument(
        '--model',
        choices=sorted(KNOWN_MODELS),
        help='architecture, for a source without a "model" entry')
    parser.add_argument(
        '--config',
        help='check the keys against the model of this config instead of '
        'the built-in description of the architecture')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_cfg = None
    if args.config:
        from mmengine.config import Config
        model_cfg = Config.fromfile(args.config).model
    try:
        meta = convert_checkpoint(
            args.src,
            args.dst,
            model=args.model,
            model_cfg=model_cfg,
            config=args.config)
    except (ConversionError, FileNotFoundError) as err:
        print(f'error: {err}\nNothing was written to {args.dst}.',
              file=sys.stderr)
        return 1
    source = meta['converted_from']
    print(f'Converted {source["model"]} (using_bn={source["using_bn"]}, '
          f'epoch {source["epoch"]}, best top-1 {source["best_prec1"]}) '
          f'-> {args.dst}')
    if meta.get('config'):
        print(f'Load it with the config {meta["config"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
