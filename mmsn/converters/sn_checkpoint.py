"""Convert the SN authors' reference checkpoints to mmpretrain checkpoints.

The authors' zoo (switchablenorms/Switchable-Normalization) saves a dict with
``epoch``, ``model`` (e.g. ``'resnetv1sn50'``), ``state_dict``,
``best_prec1`` and ``optimizer``. Keys of ``state_dict`` carry the
``module.`` prefix of the distributed wrapper; SN's gamma/beta have shape
(1, C, 1, 1) and its BN running statistics (1, C, 1).

The conversion is driven by the target model: every key of the model that
the target config builds is looked up in the source under its authors'
name (``backbone.X`` and ``head.fc.X`` are ``module.X`` and ``module.fc.X``,
after the per-model renames of :class:`ZooModel`), SN tensors are flattened
to (C,), and the ``num_batches_tracked`` counters that the authors' layer
lacks are added. Source keys that nothing asked for, keys the model needs
that the source lacks, and shapes that differ are all reported together,
each under its own name, before anything is written.
"""
import os.path as osp
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mmsn.utils.io import (DamagedFileError, check_zip_records,
                           load_error_reason, save_atomically)


@dataclass(frozen=True)
class ZooModel:
    """A model of the authors' zoo and the mmpretrain model it converts to.

    Args:
        backbone (dict): mmpretrain backbone config, without ``norm_cfg``.
        configs (dict): ``using_bn`` -> the config of ``configs/`` that loads
            the converted checkpoint.
        renames (tuple): ``(pattern, replacement)`` pairs (``re.sub``) from
            a target name below ``backbone.`` to the authors' name below
            ``module.``, for the few modules named differently.
        norm_type (str): Registered type of the norm layers.
            Defaults to ``'SN'``.
    """
    backbone: dict
    configs: Dict[bool, str] = field(default_factory=dict)
    renames: Tuple[Tuple[str, str], ...] = ()
    norm_type: str = 'SN'


# The authors' v2 shortcut is a bare ``nn.Conv2d`` (``layerK.0.downsample``);
# PreActResNet wraps it in a Sequential, as mmpretrain's ResNets do.
_V2_SHORTCUT = ((r'^(layer\d+\.\d+\.downsample)\.0\.', r'\1.'), )

KNOWN_MODELS: Dict[str, ZooModel] = {
    'resnetv1sn50':
    ZooModel(
        dict(type='ResNet', depth=50), {
            True: 'configs/resnet50_sn_8xb32.py',
            False: 'configs/resnet50_sn_8xb1.py'
        }),
    'resnetv1sn101':
    ZooModel(
        dict(type='ResNet', depth=101),
        {True: 'configs/resnet101_sn_8xb32.py'}),
    'resnetv2sn50':
    ZooModel(
        dict(type='PreActResNet', depth=50),
        {True: 'configs/resnet50v2_sn_8xb32.py'},
        renames=_V2_SHORTCUT),
    'resnetv2sn101':
    ZooModel(
        dict(type='PreActResNet', depth=101),
        {True: 'configs/resnet101v2_sn_8xb32.py'},
        renames=_V2_SHORTCUT),
    # The SSN authors' zoo (Sparse_SwitchNorm): the v1 layout with SSN layers
    # (plus their radius, mean_fixed and var_fixed buffers) and their stem
    # max-pool; their norms are sn1, sn2, ... where build_norm_layer names
    # SSN layers ssn1, ssn2, ...
    'resnetv1ssn50':
    ZooModel(
        dict(type='ResNetStemPool', depth=50,
             stem_pool=dict(kernel_size=3, stride=2, padding=0,
                            ceil_mode=True)),
        {True: 'configs/resnet50_ssn_8xb32.py'},
        renames=((r'(^|\.)ssn(\d+)\.', r'\1sn\2.'), ),
        norm_type='SSN'),
}

_PREFIX = 'module.'
# Longer lists are cut in the error message.
_MAX_LISTED = 6


class ConversionError(ValueError):
    """The source checkpoint does not match the layout that is converted."""


def detect_using_bn(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the SN layers of an authors' state dict have a BN branch.

    Three importance logits per vector mean [IN, LN, BN]; two mean [IN, LN]
    (``using_bn=False``). A mixture is refused. Whether the running
    statistics are there is checked with the other keys.
    """
    lengths = {
        tuple(value.shape)
        for key, value in state_dict.items()
        if key.endswith(('.mean_weight', '.var_weight'))
    }
    if not lengths:
        raise ConversionError(
            'No SN layer (key ending in ".mean_weight" or ".var_weight") '
            'found: this is not a checkpoint of the Switchable '
            'Normalization zoo')
    if lengths == {(3, )}:
        return True
    if lengths == {(2, )}:
        return False
    raise ConversionError(
        f'SN importance logits must all have shape (3,) (with BN branch) or '
        f'all (2,) (without); found shapes {sorted(lengths)}')


def expected_model_cfg(model: str, using_bn: bool,
                       num_classes: int = 1000) -> dict:
    """mmpretrain model config of the authors' ``model`` (e.g.
    ``'resnetv2sn50'``), with the parameter names of the configs in
    ``configs/``, so the conversion can be checked without them."""
    arch = _zoo_model(model)
    backbone = dict(
        arch.backbone,
        norm_cfg=dict(type=arch.norm_type, using_bn=using_bn))
    return dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead', num_classes=num_classes, in_channels=2048))


def suggested_config(model: str, using_bn: bool) -> Optional[str]:
    """Path (relative to the repository root) of the matching config."""
    return _zoo_model(model).configs.get(using_bn)


def _zoo_model(model: Optional[str]) -> ZooModel:
    if model not in KNOWN_MODELS:
        raise ConversionError(
            f'Unknown model {model!r}; this converter knows '
            f'{", ".join(sorted(KNOWN_MODELS))} (pass --model to name the '
            f'architecture of a checkpoint without a "model" entry)')
    return KNOWN_MODELS[model]


def authors_name(target_key: str,
                 renames: Tuple[Tuple[str, str], ...] = ()) -> Optional[str]:
    """The authors' name (without ``module.``) of an mmpretrain key, or None
    for a key that has no counterpart in their checkpoints."""
    for part in ('backbone.', 'head.'):
        if target_key.startswith(part):
            name = target_key[len(part):]
            break
    else:
        return None
    if part == 'backbone.':
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
    return name


def _listing(items: List[str], sep: str = ', ') -> str:
    shown = sep.join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f'{sep}and {len(items) - _MAX_LISTED} more'
    return shown


def _sn_layouts(channels: int) -> Tuple[Tuple[int, ...], ...]:
    """The authors' shapes of SN's per-channel tensors: gamma and beta
    (1, C, 1, 1), running statistics (1, C, 1). Nothing else is reshaped,
    even with as many elements."""
    return (1, channels, 1, 1), (1, channels, 1)


def convert_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        expected: Mapping[str, torch.Tensor],
        renames: Tuple[Tuple[str, str], ...] = ()) -> OrderedDict:
    """Map an authors' state dict onto the keys and shapes of ``expected``.

    Args:
        state_dict (dict): The authors' ``state_dict``, with or without the
            ``module.`` prefix.
        expected (dict): State dict of the target mmpretrain model (only
            its keys and shapes are used).
        renames (tuple): See :class:`ZooModel`.

    Returns:
        OrderedDict: The keys of ``expected`` with the source's tensors, SN
        tensors flattened from (1, C, 1, 1) / (1, C, 1) to (C,), and a
        ``num_batches_tracked`` counter of 0 for every layer that has one.

    Raises:
        ConversionError: Listing, under the source's names, every source key
            without a place in the model, every key the model needs that the
            source lacks, and every shape that differs.
    """
    prefix = _PREFIX if any(k.startswith(_PREFIX)
                            for k in state_dict) else ''
    by_name = {
        key[len(_PREFIX):] if key.startswith(_PREFIX) else key: key
        for key in state_dict
    }
    converted = OrderedDict()
    used, missing, not_tensors, mismatched = set(), [], [], []
    for key, target in expected.items():
        if key.endswith('.num_batches_tracked'):
            # The authors' layer does not count batches; with a fixed
            # momentum the counter is not used.
            converted[key] = torch.zeros_like(target)
            continue
        name = authors_name(key, renames)
        if name not in by_name:
            missing.append(f'{prefix}{name or key}')
            continue
        used.add(name)
        source_key = by_name[name]
        value = state_dict[source_key]
        if not isinstance(value, torch.Tensor):
            not_tensors.append(f'{source_key} ({type(value).__name__})')
            continue
        if target.dim() == 1 and tuple(value.shape) in _sn_layouts(
                target.numel()):
            value = value.reshape(target.shape)  # (1, C, 1, 1) -> (C,)
        if value.shape != target.shape:
            mismatched.append(f'{source_key} has shape {tuple(value.shape)} '
                              f'but {key} needs {tuple(target.shape)}')
            continue
        converted[key] = value
    unknown = [key for name, key in by_name.items() if name not in used]

    problems = []
    if unknown:
        problems.append('unknown keys (no place in the target model): ' +
                        _listing(unknown))
    if missing:
        problems.append('keys the target model needs but the source lacks: '
                        + _listing(missing))
    if not_tensors:
        problems.append('values that are not tensors: ' +
                        _listing(not_tensors))
    if mismatched:
        problems.append('shape mismatches: ' + _listing(mismatched, '; '))
    if problems:
        raise ConversionError('\n'.join(problems))
    return converted


def _build_expected(model_cfg: dict) -> Dict[str, torch.Tensor]:
    import mmsn  # noqa: F401  (registers SN and PreActResNet)
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(model_cfg)
    return model.state_dict()


def _load_source(src: str) -> dict:
    from mmsn.utils.checkpoint import numpy_safe_globals
    try:
        check_zip_records(src)
    except DamagedFileError as err:
        raise ConversionError(str(err)) from None
    try:
        # Only tensors, plain values and numpy scalars (best_prec1).
        with torch.serialization.safe_globals(numpy_safe_globals()):
            checkpoint = torch.load(
                src, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling errors of all kinds
        raise ConversionError(
            f'Cannot read {src} as a PyTorch checkpoint of tensors and plain '
            f'values ({load_error_reason(err)}); the authors\' checkpoints '
            f'hold nothing else') from err
    if not isinstance(checkpoint, dict):
        raise ConversionError(
            f'{src} holds a {type(checkpoint).__name__}, expected a dict '
            f'with "state_dict" and "model"')
    return checkpoint


def _plain(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, 'item'):  # numpy scalars
        return value.item()
    return value


def convert_checkpoint(src: str,
                       dst: str,
                       model: Optional[str] = None,
                       model_cfg: Optional[dict] = None,
                       config: Optional[str] = None) -> dict:
    """Convert the authors' checkpoint ``src`` and save it to ``dst``.

    Nothing is written unless every key and shape matches the target model.

    Args:
        src (str): The authors' checkpoint (``.pth.tar``).
        dst (str): Output path of the mmpretrain checkpoint.
        model (str, optional): Model name, e.g. ``'resnetv1sn50'``, for a
            source without (or with a wrong) ``model`` entry. Defaults to
            the source's own entry.
        model_cfg (dict, optional): Model config to check against, e.g.
            ``Config.fromfile(config).model``. Defaults to
            :func:`expected_model_cfg` of the source's architecture.
        config (str, optional): Path of the config ``model_cfg`` comes from,
            recorded in the meta.

    Returns:
        dict: The meta written into the checkpoint.
    """
    checkpoint = _load_source(src)
    state_dict = checkpoint.get('state_dict')
    if not isinstance(state_dict, dict):
        raise ConversionError(
            f'{src} has no "state_dict" dict (top-level keys: '
            f'{sorted(checkpoint)})')
    name = model or checkpoint.get('model')
    if name is None:
        raise ConversionError(
            f'{src} has no "model" entry: pass --model, one of '
            f'{", ".join(sorted(KNOWN_MODELS))}')
    arch = _zoo_model(name)
    using_bn = detect_using_bn(state_dict)
    if model_cfg is None:
        model_cfg = expected_model_cfg(name, using_bn)
        against = (f'(checked against {name} with using_bn={using_bn}, as '
                   f'{"--model" if model else "its model entry"} says)')
    else:
        against = f'(checked against the model of {config or "model_cfg"})'
    try:
        converted = convert_state_dict(state_dict,
                                       _build_expected(model_cfg),
                                       arch.renames)
    except ConversionError as err:
        raise ConversionError(f'{err}\n{against}') from None

    from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
    meta = dict(
        converted_from=dict(
            source=osp.abspath(src),
            model=name,
            epoch=_plain(checkpoint.get('epoch')),
            best_prec1=_plain(checkpoint.get('best_prec1')),
            using_bn=using_bn,
            norm=arch.norm_type,
            converter='tools/model_converters/sn_to_mmpretrain.py'),
        config=config or suggested_config(name, using_bn))
    if converted['head.fc.weight'].shape[0] == len(IMAGENET_CATEGORIES):
        # The zoo is trained on ImageNet-1k (class order of its folders,
        # which is mmpretrain's order); inferencers read the names here.
        meta['dataset_meta'] = dict(classes=IMAGENET_CATEGORIES)
    save_atomically(dict(meta=meta, state_dict=converted), dst)
    return meta
