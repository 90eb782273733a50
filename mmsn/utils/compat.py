"""Make OpenMMLab's BN-only tools aware of SN.

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

Each patch is applied once and wraps the original function.
"""
import importlib

from torch import nn

from mmsn.models.norms import SyncSwitchableNorm
from mmsn.models.norms.switchable_norm import _SwitchableNorm

IMPORTANCE_PARAMS = ('mean_weight', 'var_weight')


def _is_plain_sn(module: nn.Module) -> bool:
    return isinstance(module, _SwitchableNorm) and not isinstance(
        module, SyncSwitchableNorm)


def _patch_torch_sync_conversion() -> None:
    original = nn.SyncBatchNorm.convert_sync_batchnorm.__func__
    if getattr(original, '_mmsn_patched', False):
        return

    def convert_sync_batchnorm(cls, module, process_group=None):
        if _is_plain_sn(module):
            return SyncSwitchableNorm.convert_sync_switchable_norm(
                module, process_group)
        return original(cls, module, process_group)

    convert_sync_batchnorm._mmsn_patched = True
    convert_sync_batchnorm.__doc__ = original.__doc__
    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(
        convert_sync_batchnorm)


def _patch_mmengine_sync_conversion() -> None:
    utils = importlib.import_module('mmengine.model.utils')
    original = utils.convert_sync_batchnorm
    if getattr(original, '_mmsn_patched', False):
        return

    def convert_sync_batchnorm(module, implementation='torch'):
        if _is_plain_sn(module):
            return SyncSwitchableNorm.convert_sync_switchable_norm(module)
        return original(module, implementation)

    convert_sync_batchnorm._mmsn_patched = True
    convert_sync_batchnorm.__doc__ = original.__doc__
    # The original recurses through this module global, so every SN below
    # the root reaches the wrapper; the re-exports cover an SN root.
    utils.convert_sync_batchnorm = convert_sync_batchnorm
    for name in ('mmengine.model', 'mmengine.runner.runner',
                 'mmengine._strategy.distributed'):
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - optional parts of mmengine
            continue
        if getattr(mod, 'convert_sync_batchnorm', None) is original:
            mod.convert_sync_batchnorm = convert_sync_batchnorm


def _patch_mmcv_fuse_conv_bn() -> None:
    try:
        fuse_module = importlib.import_module('mmcv.cnn.utils.fuse_conv_bn')
    except ImportError:  # mmcv not installed
        return
    original = fuse_module._fuse_conv_bn
    if getattr(original, '_mmsn_patched', False):
        return

    def _fuse_conv_bn(conv, bn):
        if isinstance(bn, _SwitchableNorm):
            raise TypeError(
                f'fuse_conv_bn cannot fold {type(bn).__name__} into the '
                f'preceding conv: Switchable Normalization mixes instance and '
                f'layer statistics of each input, so it is not a fixed '
                f'affine map. Leave SN layers unfused (e.g. drop '
                f'--fuse-conv-bn).')
        return original(conv, bn)

    _fuse_conv_bn._mmsn_patched = True
    fuse_module._fuse_conv_bn = _fuse_conv_bn


def _patch_optim_constructor() -> None:
    from mmengine.optim import DefaultOptimWrapperConstructor
    original = DefaultOptimWrapperConstructor.add_params
    if getattr(original, '_mmsn_patched', False):
        return

    def add_params(self, params, module, prefix='', is_dcn_module=None):
        first = len(params)
        original(self, params, module, prefix, is_dcn_module)
        if not isinstance(module, _SwitchableNorm) or self.base_wd is None:
            return
        custom_keys = self.paramwise_cfg.get('custom_keys', {})
        importance = {
            id(getattr(module, name)): f'{prefix}.{name}'
            for name in IMPORTANCE_PARAMS
        }
        for group in params[first:]:
            full_name = importance.get(id(group['params'][0]))
            if full_name is None or any(key in full_name
                                        for key in custom_keys):
                continue
            # norm_decay_mult is for gamma/beta; the importance logits keep
            # the base decay, as in the authors' recipe.
            group.pop('weight_decay', None)

    add_params._mmsn_patched = True
    add_params.__doc__ = original.__doc__
    DefaultOptimWrapperConstructor.add_params = add_params


def apply_patches() -> None:
    """Teach torch/mmengine/mmcv's BN-only helpers about SN (idempotent)."""
    _patch_torch_sync_conversion()
    _patch_mmengine_sync_conversion()
    _patch_mmcv_fuse_conv_bn()
    _patch_optim_constructor()


__all__ = ['apply_patches', 'IMPORTANCE_PARAMS']
