"""Collapse a trained SSN/SN checkpoint into a plain config and checkpoint.

The source model is built from its config and checkpoint; every SN/SSN layer
is collapsed (:func:`collapse_model`); the collapsed model's config
(:func:`collapsed_config`) is built, given the collapsed state, and checked
against the source model on a batch before anything is written.
"""
import copy
import os
import os.path as osp
from typing import List, Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from torch import nn

from mmsn.utils.io import save_atomically
from mmsn_runtime import CollapsedNorm
from .collapse import CollapseError, collapse_model
from .config import collapsed_config

# float32 logits of a collapsed SSN model match the SSN model to this
# relative precision (the statistics are summed in another order).
SSN_REL_TOLERANCE = 1e-4


def _build(cfg: Config) -> nn.Module:
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope(
            cfg.get('default_scope', 'mmpretrain')):
        return MODELS.build(cfg.model)


def _tensors(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def _input_shape(cfg: Config, shape: Optional[Sequence[int]]):
    if shape:
        return tuple(shape)
    channels = cfg.model.get('backbone', {}).get('in_channels', 3)
    size = 224
    for step in cfg.get('test_dataloader', {}).get('dataset', {}).get(
            'pipeline', []):
        if step.get('type') == 'CenterCrop':
            size = step['crop_size']
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, ) + size


def sample_batch(cfg: Config, model: nn.Module, source: str,
                 batch_size: int, shape: Optional[Sequence[int]],
                 seed: int = 0) -> torch.Tensor:
    """Model inputs: random (N, C, H, W) or the first test batch (through
    the model's data preprocessor)."""
    if source == 'random':
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((batch_size, ) + _input_shape(cfg, shape),
                           generator=gen)
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.batch_size = batch_size
    loader_cfg.num_workers = 0
    loader_cfg.persistent_workers = False
    with DefaultScope.overwrite_default_scope(
            cfg.get('default_scope', 'mmpretrain')):
        loader = Runner.build_dataloader(loader_cfg, seed=seed)
        data = model.data_preprocessor(next(iter(loader)), False)
    return data['inputs']


def _rename_map(src: nn.Module, dst: nn.Module) -> dict:
    """Module names of the collapsed layers in the source model (``ssn1``)
    -> in the model of the collapsed config (``cn1``), in module order."""
    src_names = [n for n, m in src.named_modules()
                 if isinstance(m, CollapsedNorm)]
    dst_names = [n for n, m in dst.named_modules()
                 if isinstance(m, CollapsedNorm)]
    if len(src_names) != len(dst_names):
        raise CollapseError(
            f'The collapsed config builds {len(dst_names)} CollapsedNorm '
            f'layers but the model has {len(src_names)} SN/SSN layers '
            f'(norm layers built outside norm_cfg cannot be rewritten)')
    return dict(zip(src_names, dst_names))


def _renamed_state(src: nn.Module, mapping: dict) -> dict:
    state = {}
    for key, value in src.state_dict().items():
        layer, _, attr = key.rpartition('.')
        state[f'{mapping.get(layer, layer)}.{attr}' if layer else key] = value
    return state


def collapse_checkpoint(config: str,
                        checkpoint: str,
                        out_dir: str,
                        sn_tolerance: Optional[float] = None,
                        batch: str = 'random',
                        batch_size: int = 2,
                        input_shape: Optional[Sequence[int]] = None) -> dict:
    """Write ``OUT_DIR/<config name>_collapsed.{py,pth}``.

    Returns:
        dict: ``picks`` (:class:`LayerPick` list), ``config`` and
        ``checkpoint`` (written paths), ``max_abs_change`` and
        ``rel_change`` of the outputs on the batch, ``report`` of
        :func:`collapsed_config`.

    Raises:
        CollapseError: a layer does not collapse, or a collapsed SSN model
            does not reproduce the outputs (nothing is written then).
    """
    cfg = Config.fromfile(config)
    source = _build(cfg)
    meta = load_checkpoint(source, checkpoint, map_location='cpu',
                           strict=True, logger='silent').get('meta', {})
    source.eval()
    collapsed = copy.deepcopy(source)
    picks = collapse_model(collapsed, sn_tolerance)

    new_cfg, report = collapsed_config(cfg)
    target = _build(new_cfg)
    target.load_state_dict(
        _renamed_state(collapsed, _rename_map(collapsed, target)),
        strict=True)
    target.eval()

    inputs = sample_batch(cfg, source, batch, batch_size, input_shape)
    with torch.no_grad():
        expected = _tensors(source(inputs, mode='tensor'))
        got = _tensors(target(inputs, mode='tensor'))
    change = max((g - e).abs().max().item() for g, e in zip(got, expected))
    scale = max(e.abs().max().item() for e in expected)
    rel_change = change / max(scale, 1e-12)
    exact = all(p.distance == 0 for p in picks)
    if exact and rel_change > SSN_REL_TOLERANCE:
        raise CollapseError(
            f'The collapsed model changes the outputs by {rel_change:.3g} '
            f'(relative) though every layer is one-hot; this is a bug, '
            f'nothing was written')

    os.makedirs(out_dir, exist_ok=True)
    stem = osp.splitext(osp.basename(config))[0] + '_collapsed'
    cfg_path = osp.join(out_dir, stem + '.py')
    ckpt_path = osp.join(out_dir, stem + '.pth')
    new_meta = dict(
        collapsed_from=dict(
            config=osp.abspath(config),
            checkpoint=osp.abspath(checkpoint),
            sn_tolerance=sn_tolerance,
            picks=[dict(layer=p.name, mean=p.mean, var=p.var,
                        distance=p.distance) for p in picks],
            max_abs_change=change,
            rel_change=rel_change))
    if 'dataset_meta' in meta:
        new_meta['dataset_meta'] = meta['dataset_meta']
    save_atomically(dict(meta=new_meta, state_dict=target.state_dict()),
                 ckpt_path)
    new_cfg.dump(cfg_path)
    return dict(picks=picks, config=cfg_path, checkpoint=ckpt_path,
                max_abs_change=change, rel_change=rel_change,
                report=report, batch_shape=tuple(inputs.shape))
