"""Gradient clipping of selected parameter groups (SSN's importance
parameters), for any optimizer wrapper.

mmengine's ``OptimWrapper(clip_grad=...)`` clips the gradient of all
parameters together. SSN's recipe clips only the importance parameters (to
norm 1, jointly, before each step). The groups to clip are selected with
mmengine's ``paramwise_cfg.custom_keys``, whose extra entries end up in the
parameter groups::

    optim_wrapper = dict(
        constructor='GroupClipOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
        paramwise_cfg=dict(custom_keys={
            '.mean_weight': dict(lr_mult=.1, decay_mult=0., max_grad_norm=1.),
            '.var_weight': dict(lr_mult=.1, decay_mult=0., max_grad_norm=1.)}))

Groups with the same ``max_grad_norm`` are clipped together: one L2 norm
over all of them, as ``torch.nn.utils.clip_grad_norm_`` on their list. (A
plain number, so that the optimizer's state in checkpoints stays loadable
with ``weights_only=True``.)

The clipping runs as a step pre-hook of the torch optimizer, not in an
``OptimWrapper`` subclass: ``--amp`` replaces the wrapper type with
``AmpOptimWrapper``, which would drop a subclass's clipping, and
``AmpOptimWrapper`` unscales the gradients before ``optimizer.step()``
(inside ``GradScaler.step``), so a pre-hook sees true gradients with and
without AMP.
"""
from collections import OrderedDict

import torch
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

CLIP_KEY = 'max_grad_norm'


def clip_group_gradients(optimizer: torch.optim.Optimizer, *_) -> None:
    """Clip the gradients of the groups with a ``max_grad_norm``, jointly per
    value (a step pre-hook)."""
    selected = OrderedDict()
    for group in optimizer.param_groups:
        if group.get(CLIP_KEY) is not None:
            selected.setdefault(group[CLIP_KEY], []).extend(
                p for p in group['params'] if p.grad is not None)
    for max_norm, params in selected.items():
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class GroupClipOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """:class:`DefaultOptimWrapperConstructor` that also clips the gradient
    of the parameter groups given a ``max_grad_norm`` (through
    ``paramwise_cfg.custom_keys``) before every optimizer step."""

    def __call__(self, model):
        optim_wrapper = super().__call__(model)
        clipped = [
            group for group in optim_wrapper.optimizer.param_groups
            if group.get(CLIP_KEY) is not None
        ]
        if not clipped:
            raise ValueError(
                f'GroupClipOptimWrapperConstructor: no parameter group has '
                f'a {CLIP_KEY}; set it in paramwise_cfg.custom_keys (e.g. '
                f'{{".mean_weight": dict({CLIP_KEY}=1.0)}})')
        for group in clipped:
            if not (isinstance(group[CLIP_KEY], (int, float))
                    and group[CLIP_KEY] > 0):
                raise ValueError(f'{CLIP_KEY} must be a positive number, got '
                                 f'{group[CLIP_KEY]!r}')
        optim_wrapper.optimizer.register_step_pre_hook(clip_group_gradients)
        return optim_wrapper
