"""Collapse a trained SSN/SN checkpoint into a plain config and checkpoint.

The source model is built from its config and checkpoint; every SN/SSN layer
is collapsed (:func:`collapse_model`); the collapsed model's config
(:func:`collapsed_config`) is built, given the collapsed state, and checked
against the source model on a batch before anything is written.
"""
import contextlib
import copy
import functools
import os
import os.path as osp
import pickle
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from torch import nn

from mmsn.utils.io import (DamagedFileError, atomic_output,
                           check_zip_records, load_error_reason)
from mmsn.utils.tool_setup import find_config
from mmsn_runtime import CollapsedNorm
from .collapse import CollapseError, collapse_model
from .config import collapsed_config

# How mmengine's strict load_state_dict begins its error.
_STRICT_MISMATCH = 'The model and loaded state dict do not match exactly'
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


def _missing_folders(path: str) -> List[str]:
    """The folders ``os.makedirs(path)`` would create, outermost first;
    CollapseError if something on the way is not a folder."""
    missing = []
    path = osp.abspath(path)
    while not osp.exists(path):
        missing.append(path)
        path = osp.dirname(path)
    if not osp.isdir(path):
        raise CollapseError(
            f'Cannot write into {missing[-1] if missing else path}: {path} '
            f'is a file, not a folder')
    return missing[::-1]


def _check_writable(out_dir: str) -> None:
    """Refuse an output folder that cannot be written, before the work:
    a file on the way, or no permission (an anonymous temporary file, which
    leaves nothing behind, in its nearest existing folder)."""
    missing = _missing_folders(out_dir)
    existing = osp.dirname(missing[0]) if missing else osp.abspath(out_dir)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CollapseError(
            f'Cannot write into {existing}: {err.strerror}') from None


def _write(outputs: Dict[str, Callable[[str], None]], out_dir: str) -> None:
    """Write every ``path: write(tmp)`` of ``outputs`` into ``out_dir``,
    all or (as far as the file system allows) none: each to its partial
    file (:func:`atomic_output`), moved into place once all are complete;
    the folders created for them are removed again on failure."""
    created = _missing_folders(out_dir)
    destination = {}    # partial file -> the output it becomes
    try:
        with contextlib.ExitStack() as stack:
            for path in outputs:
                destination[stack.enter_context(atomic_output(path))] = path
            for tmp, path in destination.items():
                outputs[path](tmp)
    except (OSError, RuntimeError) as err:  # torch.save: RuntimeError
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        where = getattr(err, 'filename', None) or out_dir
        reason = getattr(err, 'strerror', None) or str(err)
        raise CollapseError(
            f'Cannot write {destination.get(where, where)}: {reason}'
        ) from None


def _load_source(cfg: Config, config: str, checkpoint: str):
    """The model of ``cfg`` with ``checkpoint`` loaded (strictly) and its
    meta; CollapseError when the file is missing, damaged or does not fit.
    """
    if osp.isfile(checkpoint):
        try:
            check_zip_records(checkpoint)
        except DamagedFileError as err:
            raise CollapseError(str(err)) from None
    source = _build(cfg)
    try:
        meta = load_checkpoint(source, checkpoint, map_location='cpu',
                               strict=True, logger='silent').get('meta', {})
    except FileNotFoundError:
        raise CollapseError(f'No checkpoint {checkpoint}') from None
    except RuntimeError as err:
        if _STRICT_MISMATCH in str(err):    # mmengine's load_state_dict
            raise CollapseError(
                f'{checkpoint} does not fit the model of {config}: {err}'
            ) from None
        raise CollapseError(f'Cannot read {checkpoint} as a checkpoint '
                            f'({load_error_reason(err)})') from None
    except pickle.UnpicklingError as err:
        raise CollapseError(
            f'Cannot read {checkpoint} as a checkpoint of tensors and '
            f'mmengine\'s own types ({load_error_reason(err)})') from None
    return source, meta


def collapse_checkpoint(config: str,
                        checkpoint: str,
                        out_dir: str,
                        sn_tolerance: Optional[float] = None,
                        batch: str = 'random',
                        batch_size: int = 2,
                        input_shape: Optional[Sequence[int]] = None) -> dict:
    """Write ``OUT_DIR/<config name>_collapsed.{py,pth}``. ``config``: a
    path, or the file name of one of mmsn's configs (as ``mim train``
    takes it).

    Returns:
        dict: ``picks`` (:class:`LayerPick` list), ``config`` and
        ``checkpoint`` (written paths), ``max_abs_change`` and
        ``rel_change`` of the outputs on the batch, ``report`` of
        :func:`collapsed_config`.

    Raises:
        CollapseError: for every refusal, and then nothing was written: a
            missing config or checkpoint, a damaged checkpoint (a zip
            record fails its CRC-32) or one that does not fit the model, a
            config without SN/SSN, a layer that does not collapse, a
            collapsed SSN model that does not reproduce the outputs, an
            output folder that cannot be written.
    """
    try:
        config = find_config(config)
        cfg = Config.fromfile(config)
    except FileNotFoundError as err:
        raise CollapseError(str(err)) from None
    new_cfg, report = collapsed_config(cfg)     # refuses a config without SN
    _check_writable(out_dir)
    source, meta = _load_source(cfg, config, checkpoint)
    source.eval()
    collapsed = copy.deepcopy(source)
    picks = collapse_model(collapsed, sn_tolerance)

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
            f'(relative) though every layer is one-hot; this is a bug')

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
    state = dict(meta=new_meta, state_dict=target.state_dict())
    _write({
        ckpt_path: functools.partial(torch.save, state),
        cfg_path: functools.partial(_write_text, new_cfg.pretty_text),
    }, out_dir)
    return dict(picks=picks, config=cfg_path, checkpoint=ckpt_path,
                max_abs_change=change, rel_change=rel_change,
                report=report, batch_shape=tuple(inputs.shape))


def _write_text(text: str, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
