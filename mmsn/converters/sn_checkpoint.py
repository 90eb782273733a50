"""Convert the SN authors' reference checkpoints to mmpretrain checkpoints.

The authors' zoo (switchablenorms/Switchable-Normalization) saves a dict with
``epoch``, ``model`` (e.g. ``'resnetv1sn50'``), ``state_dict``,
``best_prec1`` and ``optimizer``. Keys of ``state_dict`` carry the
``module.`` prefix of the distributed wrapper; SN's gamma/beta have shape
(1, C, 1, 1) and its BN running statistics (1, C, 1).

Below the prefix, the backbone names already match mmpretrain's ``ResNet``
(v1) and mmsn's ``PreActResNet`` (v2) built with ``norm_cfg=dict(type='SN')``
(``conv1``, ``sn1``, ``layer1.0.sn2``, ``layer1.0.downsample.0``, ``sn_out``);
so the conversion is: drop ``module.``, put the backbone under
``backbone.`` and ``fc`` under ``head.fc``, flatten the SN tensors to (C,),
and add the ``num_batches_tracked`` counter that the authors' layer lacks.
Every key and shape is checked against the model that the target config
builds before anything is written.
"""
import os
import os.path as osp
import re
import tempfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

# Architecture of each model name of the authors' zoo.
KNOWN_MODELS = {
    'resnetv1sn50': dict(version=1, depth=50),
    'resnetv1sn101': dict(version=1, depth=101),
    'resnetv2sn50': dict(version=2, depth=50),
    'resnetv2sn101': dict(version=2, depth=101),
    # The SSN authors' zoo (Sparse_SwitchNorm): the v1 layout with SSN
    # layers (plus radius, mean_fixed, var_fixed) and their stem pooling.
    'resnetv1ssn50': dict(version=1, depth=50, norm='SSN'),
}

# The configs of ``configs/`` that load each converted checkpoint, keyed by
# (version, depth, using_bn).
SUGGESTED_CONFIGS = {
    (1, 50, True): 'configs/resnet50_sn_8xb32.py',
    (1, 101, True): 'configs/resnet101_sn_8xb32.py',
    (2, 50, True): 'configs/resnet50v2_sn_8xb32.py',
    (2, 101, True): 'configs/resnet101v2_sn_8xb32.py',
    (1, 50, False): 'configs/resnet50_sn_8xb1.py',
    (1, 50, True, 'SSN'): 'configs/resnet50_ssn_8xb32.py',
}
# Backbone arguments that an SSN model adds to the SN one.
_SSN_BACKBONE = dict(
    type='ResNetStemPool',
    stem_pool=dict(kernel_size=3, stride=2, padding=0, ceil_mode=True))

_SN_TENSORS = ('weight', 'bias', 'mean_weight', 'var_weight', 'running_mean',
               'running_var')
_PREFIX = 'module.'


class ConversionError(ValueError):
    """The source checkpoint does not match the layout that is converted."""


def _sn_layers(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Size]:
    """Names of the SN layers (by their importance logits) and their shape.
    """
    return {
        key[:-len('.mean_weight')]: value.shape
        for key, value in state_dict.items() if key.endswith('.mean_weight')
    }


def detect_using_bn(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether the SN layers of an authors' state dict have a BN branch.

    Three importance logits and running statistics mean [IN, LN, BN]; two
    and no running statistics mean [IN, LN] (``using_bn=False``). A mixture
    is refused.
    """
    layers = _sn_layers(state_dict)
    if not layers:
        raise ConversionError(
            'No SN layer (key ending in ".mean_weight") found: this is not a '
            'checkpoint of the Switchable Normalization zoo')
    lengths = {tuple(shape) for shape in layers.values()}
    if lengths == {(3, )}:
        using_bn = True
    elif lengths == {(2, )}:
        using_bn = False
    else:
        raise ConversionError(
            f'SN importance logits must all have shape (3,) (with BN branch) '
            f'or all (2,) (without); found shapes {sorted(lengths)}')
    for layer in layers:
        has_running = f'{layer}.running_mean' in state_dict
        if has_running != using_bn:
            raise ConversionError(
                f'SN layer {layer!r} has {3 if using_bn else 2} importance '
                f'logits but {"no " if not has_running else ""}running '
                f'statistics')
    return using_bn


def expected_model_cfg(version: int, depth: int, using_bn: bool,
                       num_classes: int = 1000, norm: str = 'SN') -> dict:
    """mmpretrain model config of the authors' ``resnetv{version}sn{depth}``
    (``norm='SSN'``: ``resnetv{version}ssn{depth}``).

    It has the same state-dict keys as the zoo configs in ``configs/``, so
    the conversion can be checked without them.
    """
    backbone_type = 'ResNet' if version == 1 else 'PreActResNet'
    backbone = dict(
        type=backbone_type,
        depth=depth,
        norm_cfg=dict(type=norm, using_bn=using_bn))
    if norm == 'SSN':
        backbone.update(_SSN_BACKBONE)
    return dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead', num_classes=num_classes, in_channels=2048))


def suggested_config(version: int, depth: int, using_bn: bool,
                     norm: str = 'SN') -> Optional[str]:
    """Path (relative to the repository root) of the matching config."""
    key = (version, depth, using_bn) + (() if norm == 'SN' else (norm, ))
    return SUGGESTED_CONFIGS.get(key)


def rename_norm_layers(state_dict: Dict[str, torch.Tensor],
                       abbreviation: str) -> OrderedDict:
    """Rename the authors' norm modules ``sn1``, ``sn2``, ... to the
    abbreviation of the target norm layer (``ssn1`` for SSN, as
    ``build_norm_layer`` names it); ``downsample.1`` keeps its name."""
    pattern = re.compile(r'(^|\.)sn(\d+)\.')
    return OrderedDict((pattern.sub(rf'\g<1>{abbreviation}\g<2>.', key), value)
                       for key, value in state_dict.items())


def _target_name(key: str) -> str:
    if key.startswith('fc.'):
        return 'head.' + key
    return 'backbone.' + key


def convert_state_dict(state_dict: Dict[str, torch.Tensor]) -> OrderedDict:
    """Rename and reshape an authors' state dict (no checking of the keys).

    Args:
        state_dict (dict): The authors' ``state_dict``, with or without the
            ``module.`` prefix.

    Returns:
        OrderedDict: mmpretrain keys (``backbone.*``, ``head.fc.*``) to
        tensors; SN tensors flattened to (C,) and a ``num_batches_tracked``
        counter (0) added for every SN layer with running statistics.
    """
    sn_layers = set(_sn_layers(state_dict))
    converted = OrderedDict()
    for key, value in state_dict.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        layer, _, attr = key.rpartition('.')
        if layer in sn_layers and attr in _SN_TENSORS and \
                sum(size != 1 for size in value.shape) <= 1:
            # (1, C, 1, 1) gamma/beta and (1, C, 1) running stats -> (C,);
            # anything else keeps its shape and fails the check.
            value = value.reshape(-1)
        converted[_target_name(name)] = value
        if layer in sn_layers and attr == 'running_var':
            counter = _target_name(
                name[:-len('running_var')] + 'num_batches_tracked')
            # The authors' layer does not count batches; with a fixed
            # momentum the counter is not used.
            converted[counter] = torch.tensor(0, dtype=torch.long)
    return converted


def check_against_model(converted: Dict[str, torch.Tensor],
                        expected: Dict[str, torch.Tensor],
                        source_names: Dict[str, str]) -> None:
    """Raise :class:`ConversionError` unless keys and shapes match exactly.
    """
    unknown = [k for k in converted if k not in expected]
    missing = [k for k in expected if k not in converted]
    mismatched = [
        f'{source_names.get(k, k)} gives shape {tuple(v.shape)} but {k} '
        f'needs {tuple(expected[k].shape)}' for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if unknown:
        problems.append('unknown keys (no place in the target model): ' +
                        ', '.join(source_names.get(k, k) for k in unknown))
    if missing:
        problems.append('keys the target model needs but the source lacks: '
                        + ', '.join(missing))
    if mismatched:
        problems.append('shape mismatches: ' + '; '.join(mismatched))
    if problems:
        raise ConversionError('\n'.join(problems))


def _build_expected(model_cfg: dict) -> Dict[str, torch.Tensor]:
    import mmsn  # noqa: F401  (registers SN and PreActResNet)
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(model_cfg)
    return model.state_dict()


def _load_source(src: str) -> dict:
    import mmsn  # noqa: F401  (allowlists numpy scalars for weights_only)
    try:
        checkpoint = torch.load(src, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling errors of all kinds
        raise ConversionError(
            f'Cannot read {src} as a PyTorch checkpoint of tensors and plain '
            f'values: {err}') from err
    if not isinstance(checkpoint, dict):
        raise ConversionError(
            f'{src} holds a {type(checkpoint).__name__}, expected a dict '
            f'with "state_dict" and "model"')
    return checkpoint


def _plain(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
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
    if name not in KNOWN_MODELS:
        raise ConversionError(
            f'Unknown model {name!r}; this converter knows '
            f'{", ".join(sorted(KNOWN_MODELS))} (pass --model to name the '
            f'architecture of a checkpoint without a "model" entry)')
    arch = KNOWN_MODELS[name]
    norm = arch.get('norm', 'SN')
    using_bn = detect_using_bn(state_dict)
    if model_cfg is None:
        model_cfg = expected_model_cfg(arch['version'], arch['depth'],
                                       using_bn, norm=norm)
    converted = convert_state_dict(state_dict)
    source_names = {
        _target_name(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): k
        for k in state_dict
    }
    if norm == 'SSN':
        converted = rename_norm_layers(converted, 'ssn')
        source_names = dict(
            zip(rename_norm_layers(source_names, 'ssn'),
                source_names.values()))
    check_against_model(converted, _build_expected(model_cfg), source_names)

    from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
    meta = dict(
        converted_from=dict(
            source=osp.abspath(src),
            model=name,
            epoch=_plain(checkpoint.get('epoch')),
            best_prec1=_plain(checkpoint.get('best_prec1')),
            using_bn=using_bn,
            norm=norm,
            converter='tools/model_converters/sn_to_mmpretrain.py'),
        config=config or suggested_config(arch['version'], arch['depth'],
                                          using_bn, norm))
    head_classes = converted['head.fc.weight'].shape[0]
    if head_classes == len(IMAGENET_CATEGORIES):
        # The zoo is trained on ImageNet-1k (class order of its folders,
        # which is mmpretrain's order); inferencers read the names here.
        meta['dataset_meta'] = dict(classes=IMAGENET_CATEGORIES)

    # Write to a temporary file first so a failed save leaves no partial DST.
    out_dir = osp.dirname(osp.abspath(dst))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix='.tmp')
    os.close(fd)
    try:
        torch.save(dict(meta=meta, state_dict=converted), tmp)
        os.replace(tmp, dst)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return meta


def architecture_of(model: str) -> Tuple[int, int]:
    """(version, depth) of a model name of the authors' zoo."""
    if model not in KNOWN_MODELS:
        raise ConversionError(f'Unknown model {model!r}')
    arch = KNOWN_MODELS[model]
    return arch['version'], arch['depth']
