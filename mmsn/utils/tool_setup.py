"""What mmsn's tools share before and around their work.

* :func:`find_config`: a config given as a path, or by its file name as
  ``mim train mmsn NAME.py`` takes it (``mim run`` passes names through
  unresolved);
* :func:`add_runner_args`, :func:`parse_runner_args`, :func:`set_work_dir`,
  :func:`set_dataloader_defaults`: the arguments and config defaults that
  ``tools/train.py`` and ``tools/test.py`` share with mmpretrain's;
* :func:`run_runner`: builds the Runner and runs it, on machines without CUDA
  inside a gloo process group (:mod:`mmsn.utils.dist`).
"""
import argparse
import difflib
import os
import os.path as osp
from copy import deepcopy
from typing import Callable, List, Optional, Sequence, TypeVar

from mmengine.config import Config, ConfigDict, DictAction

from .dist import cpu_distributed

T = TypeVar('T')
PACKAGE_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def config_root() -> Optional[str]:
    """The folder of mmsn's configs: ``mmsn/.mim/configs`` in an installed
    mmsn (where ``mim`` looks), else ``configs/`` of a source checkout."""
    for root in (osp.join(PACKAGE_ROOT, '.mim', 'configs'),
                 osp.join(osp.dirname(PACKAGE_ROOT), 'configs')):
        if osp.isdir(root):
            return root
    return None


def _config_files(root: str) -> List[str]:
    return sorted(
        osp.join(folder, name)
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names if name.endswith('.py'))


def find_config(config: str) -> str:
    """The path of ``config``: itself if it is a file, else mmsn's config
    of that file name (``.py`` may be left out), as ``mim train`` finds it.

    Raises:
        FileNotFoundError: Neither a file nor the name of exactly one of
            mmsn's configs; the message names the close ones, or the
            several that have the name.
    """
    if osp.isfile(config):
        return config
    root = config_root()
    name = osp.basename(config)
    if not name.endswith('.py'):
        name += '.py'
    files = _config_files(root) if root else []
    found = [f for f in files if osp.basename(f) == name]
    if len(found) == 1:
        return found[0]
    if found:
        raise FileNotFoundError(
            f'{config!r} is not a file, and several of mmsn\'s configs are '
            f'named {name}: ' +
            ', '.join(osp.relpath(f, root) for f in found) +
            '; give the path of one')
    where = f'among mmsn\'s configs in {root}' if root else (
        'and this mmsn has no configs folder')
    close = difflib.get_close_matches(
        name, sorted({osp.basename(f) for f in files}), n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise FileNotFoundError(
        f'{config!r} is neither a file nor the name of a config {where}'
        f'{hint}')


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local-rank``, as in
    mmpretrain's train and test tools."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser: argparse.ArgumentParser,
                      argv: Optional[Sequence[str]] = None
                      ) -> argparse.Namespace:
    """Parse, and set ``LOCAL_RANK`` from ``--local-rank`` unless a
    launcher did."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def set_work_dir(cfg: Config, work_dir: Optional[str], config: str) -> None:
    """``--work-dir``, else the config's ``work_dir``, else
    ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config))[0])


def set_dataloader_defaults(cfg: Config, fields: Sequence[str],
                            defaults: dict, overrides: dict) -> None:
    """Fill in the dataloaders named by ``fields``: ``defaults`` (and
    ``default_collate``) where the config leaves them out, ``overrides``
    (e.g. ``pin_memory=False`` from ``--no-pin-memory``) in any case."""
    for field in fields:
        if cfg.get(field, None) is None:
            continue
        loader = ConfigDict(collate_fn=dict(type='default_collate'),
                            **deepcopy(defaults))
        loader.update(cfg[field])
        loader.update(overrides)
        cfg[field] = loader


def run_runner(cfg: Config, action: Callable[..., T]) -> T:
    """Build the Runner of ``cfg`` (``runner_type`` if given) and return
    ``action(runner)``; on a machine without CUDA a distributed launcher
    runs it in a gloo process group, destroyed after the Runner, so the
    result must not hold the (wrapped) model."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    with cpu_distributed(cfg):
        runner = (Runner.from_cfg(cfg)
                  if 'runner_type' not in cfg else RUNNERS.build(cfg))
        result = action(runner)
        # the model's DDP wrapper goes before the process group it uses
        del runner
    return result
