"""Turn the BatchNorm (and GroupNorm) layers of any PyTorch model into SN.

:func:`convert_switchable_norm` is to SN what
``nn.SyncBatchNorm.convert_sync_batchnorm`` is to SyncBN: it walks a model
(torchvision's, timm's, your own), replaces each norm layer by the SN or SSN
layer of the same arity and shape, and hands the new layer the old one's
parameter and buffer tensors.
"""
import warnings
from typing import Dict, List, Optional, Type

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .norms import (SparseSwitchableNorm1d, SparseSwitchableNorm2d,
                    SparseSwitchableNorm3d, SwitchableNorm1d,
                    SwitchableNorm2d, SwitchableNorm3d,
                    SyncSparseSwitchableNorm, SyncSwitchableNorm)
from .norms.switchable_norm import _SwitchableNorm

# norm_type -> the layer per number of spatial dims (1/2/3), and 'sync'
_LAYERS: Dict[str, Dict[object, Type[_SwitchableNorm]]] = {
    'SN': {
        1: SwitchableNorm1d,
        2: SwitchableNorm2d,
        3: SwitchableNorm3d,
        'sync': SyncSwitchableNorm
    },
    'SSN': {
        1: SparseSwitchableNorm1d,
        2: SparseSwitchableNorm2d,
        3: SparseSwitchableNorm3d,
        'sync': SyncSparseSwitchableNorm
    },
}
_BN_DIMS = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))


def convert_switchable_norm(module: nn.Module,
                            norm_type: str = 'SN',
                            *,
                            group_norm_dim: Optional[int] = None,
                            using_bn: bool = True,
                            moving_average: bool = True,
                            unbiased: bool = True) -> nn.Module:
    """Replace the BatchNorm layers of ``module`` by SN (or SSN) layers.

    ``nn.BatchNorm1d/2d/3d`` become ``SwitchableNorm1d/2d/3d`` (or
    ``SparseSwitchableNorm1d/2d/3d``), ``nn.SyncBatchNorm`` becomes
    ``SyncSwitchableNorm`` (``SyncSparseSwitchableNorm``) with its process
    group; with ``group_norm_dim``, ``nn.GroupNorm`` layers are replaced too.
    Each new layer keeps ``num_features``, ``eps``, ``momentum`` (GroupNorm
    has none: the SN layer's default), ``affine`` and the training mode, and
    takes over the old layer's gamma and beta (``weight``, ``bias``) and, with
    ``using_bn``, its running statistics and ``num_batches_tracked``: the same
    tensors, not copies, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.
    The importance logits start at SN's initialization (equal shares) and
    are trained if gamma is. SN and SSN layers already in the model are
    left as they are.

    The model is changed in place (``copy.deepcopy`` it first to keep the
    original); the returned module is ``module`` itself, or the new layer
    when ``module`` is a norm layer. Every layer is checked before anything
    is replaced: a layer that cannot be mapped stops the conversion with a
    ``ValueError`` naming each such layer and why, and the model is left
    untouched. Refused are: a BatchNorm without running statistics
    (``track_running_stats=False``) unless ``using_bn=False`` (SN's BN branch
    normalizes with running statistics in eval), a subclass that overrides
    ``forward`` (e.g. timm's ``BatchNormAct2d``, which also applies an
    activation SN would drop), other ``_BatchNorm`` classes (their input
    rank is unknown), an uninitialized lazy layer, and values SN does not
    accept (e.g. ``eps=0``).

    Args:
        module (nn.Module): The model (or a single norm layer).
        norm_type (str): ``'SN'`` (softmax shares) or ``'SSN'`` (sparse
            shares; SSN's radius must then grow over training, see
            ``mmsn.engine.SSNRadiusHook``). Defaults to ``'SN'``.
        group_norm_dim (int, optional): Also replace ``nn.GroupNorm`` layers,
            by the layer for inputs with this many spatial dims: 1
            (``SwitchableNorm1d``, (N, C) or (N, C, L) input), 2 (``...2d``,
            (N, C, H, W)) or 3 (``...3d``). GroupNorm does not record its
            input's rank, so it is asked. Defaults to None (GroupNorm layers
            stay).
        using_bn (bool): Give the new layers the BN branch, with the old
            layers' running statistics. False mixes IN and LN only and drops
            the running statistics. Defaults to True.
        moving_average (bool): Update the running statistics as a moving
            average (True) or as the average of all batches (see
            ``SwitchableNorm2d``). Defaults to True.
        unbiased (bool): Unbiased IN variance, as in the SN authors' layers.
            Defaults to True.

    Returns:
        nn.Module: ``module`` with its norm layers replaced.

    Example:
        >>> import torchvision
        >>> from mmsn import convert_switchable_norm
        >>> model = convert_switchable_norm(torchvision.models.resnet18())
        >>> type(model.bn1).__name__
        'SwitchableNorm2d'
    """
    layers = _LAYERS.get(norm_type) if isinstance(norm_type, str) else None
    if layers is None:
        raise ValueError(f'norm_type must be one of {sorted(_LAYERS)}, got '
                         f'{norm_type!r}')
    if group_norm_dim is not None and (isinstance(group_norm_dim, bool)
                                       or group_norm_dim not in (1, 2, 3)):
        raise ValueError(f'group_norm_dim must be None, 1, 2 or 3, got '
                         f'{group_norm_dim!r}')
    for name, value in dict(using_bn=using_bn, moving_average=moving_average,
                            unbiased=unbiased).items():
        if not isinstance(value, bool):
            raise TypeError(f'{name} must be True or False, got {value!r}')

    options = dict(using_bn=using_bn, moving_average=moving_average,
                   unbiased=unbiased)
    replacements: Dict[int, nn.Module] = {}
    problems: List[str] = []
    for name, child in module.named_modules():
        try:
            new = _replacement(child, layers, group_norm_dim, options)
        except (TypeError, ValueError) as err:
            problems.append(f'{name or "(the module itself)"} '
                            f'({type(child).__name__}): {err}')
            continue
        if new is not None:
            replacements[id(child)] = new
    if problems:
        raise ValueError(
            f'convert_switchable_norm cannot convert {len(problems)} '
            f'layer(s); nothing was changed:\n  ' + '\n  '.join(problems))
    if not replacements:
        left = ('' if group_norm_dim is not None else
                ' (GroupNorm layers are replaced only with group_norm_dim)')
        warnings.warn(
            f'convert_switchable_norm: {type(module).__name__} has no '
            f'BatchNorm layer to replace{left}; nothing was changed',
            stacklevel=2)
    return _swap(module, replacements)


def _replacement(module: nn.Module, layers: dict,
                 group_norm_dim: Optional[int],
                 options: dict) -> Optional[nn.Module]:
    """The SN layer that replaces ``module``, or None to keep it; raises
    ValueError/TypeError saying why it cannot be replaced."""
    if isinstance(module, _SwitchableNorm):
        return None
    if isinstance(module, nn.GroupNorm):
        if group_norm_dim is None:
            return None
        return _build(layers[group_norm_dim], module, options,
                      momentum_of=None)
    if not isinstance(module, _BatchNorm):
        return None
    if isinstance(module, LazyModuleMixin) and \
            module.has_uninitialized_params():
        raise ValueError('a lazy layer that is not initialized yet; run '
                         'one forward pass first')
    if isinstance(module, nn.SyncBatchNorm):
        key, base = 'sync', nn.SyncBatchNorm
    else:
        key, base = next(((dims, cls) for cls, dims in _BN_DIMS
                          if isinstance(module, cls)), (None, None))
        if key is None:
            raise ValueError(
                'not a BatchNorm1d/2d/3d or SyncBatchNorm, so the rank of '
                'its input (the SN layer to use) is unknown')
    if type(module).forward is not base.forward:
        raise ValueError(
            f'a subclass of {base.__name__} with its own forward, which SN '
            f'would not reproduce (it may do more than normalize, e.g. an '
            f'activation)')
    if options['using_bn'] and (not module.track_running_stats
                                or module.running_mean is None):
        raise ValueError(
            'has no running statistics (track_running_stats=False: it '
            'normalizes with batch statistics in eval too), while the BN '
            'branch of SN normalizes with running statistics in eval; '
            'convert with using_bn=False to drop the BN branch')
    extra = ({'process_group': module.process_group}
             if key == 'sync' else {})
    return _build(layers[key], module, options, momentum_of=module, **extra)


def _build(cls: type, old: nn.Module, options: dict,
           momentum_of: Optional[nn.Module], **extra) -> nn.Module:
    like = next(iter(old.parameters()), None)
    if like is None:
        like = next(iter(old.buffers()), None)
    kwargs = dict(options, **extra)
    if momentum_of is not None:
        kwargs['momentum'] = momentum_of.momentum
    if like is not None:
        kwargs.update(device=like.device, dtype=like.dtype)
    num_features = getattr(old, 'num_features', None)
    if num_features is None:  # GroupNorm
        num_features = old.num_channels
    new = cls(num_features, eps=old.eps, affine=old.affine, **kwargs)
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
        for param in (new.mean_weight, new.var_weight):
            param.requires_grad_(old.weight.requires_grad)
    if options['using_bn'] and isinstance(old, _BatchNorm):
        new.running_mean = old.running_mean
        new.running_var = old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, 'qconfig'):
        new.qconfig = old.qconfig
    return new


def _swap(module: nn.Module, replacements: Dict[int, nn.Module]) -> nn.Module:
    """``module`` with each module of ``replacements`` (by id) swapped in;
    a layer shared by several parents stays shared."""
    if id(module) in replacements:
        return replacements[id(module)]
    # not named_children(): it yields a child shared by two names only once
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _swap(child, replacements)
        if new is not child:
            module.add_module(name, new)
    return module
