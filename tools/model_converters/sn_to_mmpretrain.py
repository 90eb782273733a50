"""Convert a checkpoint of the SN authors' zoo to an mmpretrain checkpoint.

Example::

    python tools/model_converters/sn_to_mmpretrain.py \\
        resnet50v1_sn_best.pth.tar checkpoints/resnet50_sn_8xb32.pth

The source is the authors' ``{'epoch', 'model', 'state_dict', 'best_prec1',
'optimizer'}`` dict (``resnetv1sn50``, ``resnetv1sn101``, ``resnetv2sn50``,
``resnetv2sn101``, with or without the BN branch). The result loads into the
matching config of ``configs/`` with no missing or unexpected keys; unknown
or missing keys, shape mismatches or an unknown model stop the tool before
anything is written, and the message names each of them.
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
        help='check the keys against the model of this config (a path, or '
        'the file name of one of mmsn\'s configs) instead of the built-in '
        'description of the architecture')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_cfg = config = None
    try:
        if args.config:
            from mmengine.config import Config

            from mmsn.utils.tool_setup import find_config
            config = find_config(args.config)
            model_cfg = Config.fromfile(config).model
        meta = convert_checkpoint(
            args.src,
            args.dst,
            model=args.model,
            model_cfg=model_cfg,
            config=config)
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
