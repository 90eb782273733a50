"""mmsn's model zoo: where its configs and model index are, and making
mmpretrain's model names find them.

An installed mmsn carries ``configs/`` and ``model-index.yml`` under
``mmsn/.mim/`` (see setup.py), as OpenMMLab packages do; a source checkout
has them at its root. Nothing here runs at ``import mmsn``:
:func:`register_models` changes mmpretrain's model table only when called.
"""
import difflib
from pathlib import Path
from typing import List

import yaml

__all__ = [
    'config_dir', 'config_path', 'model_index_path', 'model_names',
    'register_models'
]

_PACKAGE = Path(__file__).resolve().parent


def _root() -> Path:
    """The folder that holds ``configs/`` and ``model-index.yml``."""
    for root in (_PACKAGE / '.mim', _PACKAGE.parent):
        if (root / 'model-index.yml').is_file() and (root /
                                                     'configs').is_dir():
            return root
    raise FileNotFoundError(
        f'mmsn\'s configs are missing: neither {_PACKAGE / ".mim"} nor a '
        f'source checkout around {_PACKAGE} holds configs/ and '
        f'model-index.yml. Reinstall mmsn (pip install, which copies them '
        f'into mmsn/.mim).')


def config_dir() -> str:
    """The folder of mmsn's configs (``mmsn/.mim/configs`` when installed).

    A config of your own inherits from them through it, e.g. with the
    environment variable ``MMSN_CONFIGS`` set to this folder (mmengine
    substitutes ``{{$NAME:default}}``; the default is left empty, so an
    unset variable is an error that names it)::

        _base_ = '{{$MMSN_CONFIGS:}}/resnet50_sn_8xb32.py'
    """
    return str(_root() / 'configs')


def model_index_path() -> str:
    """mmsn's ``model-index.yml`` (what ``mim search mmsn`` reads)."""
    return str(_root() / 'model-index.yml')


def config_path(name: str) -> str:
    """The path of one of mmsn's configs.

    Args:
        name (str): A path below ``configs/`` (``'batch_study/x.py'``,
            ``'_base_/models/resnet50_sn.py'``) or a config's file name,
            which is unique outside ``_base_/`` (``'resnet50_sn_8xb32.py'``);
            ``.py`` may be left out.

    Returns:
        str: The absolute path of the config file.

    Raises:
        FileNotFoundError: If there is no such config; the message names
            the closest ones.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f'name must be a config name such as '
                        f"'resnet50_sn_8xb32.py', got {name!r}")
    root = Path(config_dir())
    wanted = name if name.endswith('.py') else f'{name}.py'
    if (root / wanted).is_file():
        return str(root / wanted)
    configs = sorted(
        p.relative_to(root).as_posix() for p in root.rglob('*.py'))
    # file name -> path, outside _base_/ (where names repeat)
    by_file_name = {
        c.rsplit('/', 1)[-1]: c
        for c in configs if not c.startswith('_base_/')
    }
    if wanted in by_file_name:
        return str(root / by_file_name[wanted])
    close = difflib.get_close_matches(
        wanted, list(dict.fromkeys([*by_file_name, *configs])), n=5)
    hint = f'; did you mean {", ".join(map(repr, close))}?' if close else ''
    raise FileNotFoundError(f'mmsn has no config {name!r} in {root}{hint}')


def model_names() -> List[str]:
    """The names of the zoo's models (``configs/metafile.yml``), as
    ``mmpretrain.get_model`` takes them after :func:`register_models`."""
    root = _root()
    index = yaml.safe_load(Path(model_index_path()).read_text())
    names = []
    for metafile in index['Import']:
        meta = yaml.safe_load((root / metafile).read_text())
        names += [model['Name'] for model in meta['Models']]
    return names


def register_models() -> List[str]:
    """Add mmsn's zoo to mmpretrain's model table (idempotent).

    mmpretrain finds model names only in its own model index. After this
    call, ``mmpretrain.get_model``, ``mmpretrain.list_models`` and the
    inferencers take mmsn's model names, e.g.
    ``get_model('resnet50_sn_8xb32_in1k', pretrained='checkpoints/resnet50_sn_8xb32.pth')``
    with a checkpoint converted from the SN authors' zoo (the zoo has no
    mmpretrain checkpoints to download, so ``pretrained=True`` finds no
    weights). Imports ``mmpretrain.apis`` (seconds).

    Returns:
        list[str]: The model names registered.
    """  # noqa: E501
    from mmpretrain.apis import ModelHub
    names = model_names()
    if not all(ModelHub.has(name.lower()) for name in names):
        ModelHub.register_model_index(
            model_index_path(), config_prefix=str(_root()))
    return names
