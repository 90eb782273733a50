"""The patches that make OpenMMLab's BN-only tools aware of SN.

SN derives from ``_BatchNorm`` so that ``norm_eval``, ``norm_decay_mult`` and
``PreciseBNHook`` treat it as a norm layer. Three tools would then treat it as
plain BN and silently lose its importance weights; they are taught here:

* sync conversion (``nn.SyncBatchNorm.convert_sync_batchnorm`` and mmengine's
  ``convert_sync_batchnorm``, i.e. ``sync_bn='torch'|'mmcv'``) turns SN into
  SyncSN with its state, instead of into SyncBatchNorm;
* ``mmcv.cnn.fuse_conv_bn`` refuses to fold SN into a conv (SN's statistics
  depend on the input, so it cannot be folded);
* mmengine's optimizer constructor applies ``norm_decay_mult`` to SN's gamma
  and beta but keeps the authors' weight decay on the importance weights,
  unless a ``custom_keys`` entry names them.

Each wrapper handles SN and calls the original for everything else; see
:mod:`mmsn.utils.patches` for applying and removing them.
"""
import importlib
import logging
from typing import List, Tuple

from torch import nn

from mmsn.models.norms import SyncSwitchableNorm
from mmsn.models.norms.switchable_norm import _SwitchableNorm
from .patches import Patch, Replacement, is_patched, replace, wraps_as

IMPORTANCE_PARAMS = ('mean_weight', 'var_weight')


def _is_plain_sn(module: nn.Module) -> bool:
    return isinstance(module, _SwitchableNorm) and not isinstance(
        module, SyncSwitchableNorm)


def _patch_torch_sync_conversion(name: str) -> List[Replacement]:
    raw = vars(nn.SyncBatchNorm)['convert_sync_batchnorm']
    if is_patched(raw, name):
        return []
    original = raw.__func__

    @wraps_as(name, original)
    def convert_sync_batchnorm(cls, module, process_group=None):
        if _is_plain_sn(module):
            return SyncSwitchableNorm.convert_sync_switchable_norm(
                module, process_group)
        return original(cls, module, process_group)

    return [
        replace(nn.SyncBatchNorm, 'convert_sync_batchnorm',
                classmethod(convert_sync_batchnorm))
    ]


def _patch_mmengine_sync_conversion(name: str) -> List[Replacement]:
    utils = importlib.import_module('mmengine.model.utils')
    original = utils.convert_sync_batchnorm
    if is_patched(original, name):
        return []

    @wraps_as(name, original)
    def convert_sync_batchnorm(module, implementation='torch'):
        if _is_plain_sn(module):
            return SyncSwitchableNorm.convert_sync_switchable_norm(module)
        return original(module, implementation)

    # The original recurses through this module global, so every SN below
    # the root reaches the wrapper; the re-exports cover an SN root.
    records = [
        replace(utils, 'convert_sync_batchnorm', convert_sync_batchnorm)
    ]
    for module_name in ('mmengine.model', 'mmengine.runner.runner',
                        'mmengine._strategy.distributed'):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - optional parts of mmengine
            continue
        if vars(module).get('convert_sync_batchnorm') is original:
            records.append(
                replace(module, 'convert_sync_batchnorm',
                        convert_sync_batchnorm))
    return records


def _patch_mmcv_fuse_conv_bn(name: str) -> List[Replacement]:
    # ImportError without mmcv: nothing to patch.
    fuse_module = importlib.import_module('mmcv.cnn.utils.fuse_conv_bn')
    original = fuse_module._fuse_conv_bn
    if is_patched(original, name):
        return []

    @wraps_as(name, original)
    def _fuse_conv_bn(conv, bn):
        if isinstance(bn, _SwitchableNorm):
            raise TypeError(
                f'fuse_conv_bn cannot fold {type(bn).__name__} into the '
                f'preceding conv: Switchable Normalization mixes instance and '
                f'layer statistics of each input, so it is not a fixed '
                f'affine map. Leave SN layers unfused (e.g. drop '
                f'--fuse-conv-bn).')
        return original(conv, bn)

    return [replace(fuse_module, '_fuse_conv_bn', _fuse_conv_bn)]


class _HoldBack(logging.Filter):
    """Drops the log records whose message starts with one of ``prefixes``.
    """

    def __init__(self, prefixes: Tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _patch_optim_constructor(name: str) -> List[Replacement]:
    from mmengine.logging import MMLogger, print_log
    from mmengine.optim import DefaultOptimWrapperConstructor
    original = vars(DefaultOptimWrapperConstructor)['add_params']
    if is_patched(original, name):
        return []

    @wraps_as(name, original)
    def add_params(self, params, module, prefix='', is_dcn_module=None):
        if not isinstance(module, _SwitchableNorm) or self.base_wd is None:
            return original(self, params, module, prefix, is_dcn_module)
        # mmengine logs each group's options as it adds it; the importance
        # weights' lines are held back and logged once their decay is final
        params_of = {id(getattr(module, p)): p for p in IMPORTANCE_PARAMS}
        log_names = [f'{prefix}.{p}' if prefix else p
                     for p in IMPORTANCE_PARAMS]
        hold_back = _HoldBack(
            tuple(f'paramwise_options -- {n}:' for n in log_names))
        logger = MMLogger.get_current_instance()
        first = len(params)
        logger.addFilter(hold_back)
        try:
            original(self, params, module, prefix, is_dcn_module)
        finally:
            logger.removeFilter(hold_back)
        custom_keys = self.paramwise_cfg.get('custom_keys', {})
        for group in params[first:]:
            param = params_of.get(id(group['params'][0]))
            if param is None:
                continue
            # mmengine matches custom keys against '{prefix}.{name}'
            if not any(key in f'{prefix}.{param}' for key in custom_keys):
                # norm_decay_mult is for gamma/beta; the importance logits
                # keep the base decay, as in the authors' recipe.
                group['weight_decay'] = self.base_wd
            log_name = f'{prefix}.{param}' if prefix else param
            for key, value in group.items():
                if key != 'params':
                    print_log(f'paramwise_options -- {log_name}:{key}={value}',
                              logger='current')

    return [replace(DefaultOptimWrapperConstructor, 'add_params', add_params)]


PATCHES = [
    Patch('sync-conversion-torch', 'torch.nn.SyncBatchNorm.'
          'convert_sync_batchnorm',
          'turns SN into SyncSN with its state (it would become '
          'SyncBatchNorm and lose the importance weights)',
          _patch_torch_sync_conversion),
    Patch('sync-conversion-mmengine',
          'mmengine.model.utils.convert_sync_batchnorm (and its re-exports)',
          'the same for sync_bn="torch"/"mmcv" in mmengine configs',
          _patch_mmengine_sync_conversion),
    Patch('fuse-conv-bn', 'mmcv.cnn.utils.fuse_conv_bn._fuse_conv_bn',
          'refuses to fold SN into a conv with a clear error (it would '
          'silently fold it as BN)', _patch_mmcv_fuse_conv_bn),
    Patch('optim-importance-decay', 'mmengine.optim.'
          'DefaultOptimWrapperConstructor.add_params',
          'norm_decay_mult reaches gamma/beta but not the importance '
          'weights, which keep the base weight decay as in the authors\' '
          'recipe', _patch_optim_constructor),
]

__all__ = ['PATCHES', 'IMPORTANCE_PARAMS']
