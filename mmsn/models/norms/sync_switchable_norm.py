"""Switchable Normalization with the BN statistics pooled across processes.

Only the BN branch is pooled (IN and LN statistics are per sample), and only
O(C) numbers cross the wire: two all-reduces forward and, when the input
needs a gradient, two backward.

* Precision: the pooled variance is ``sum(var_in + (mean_in - mean)^2) /
  count`` around the global mean (first all-reduce: counts and sums of the
  means; second: the centred second moments), the form single-process SN
  uses, free of the float32 cancellation of ``E[x^2] - E[x]^2`` for inputs
  with a large mean.
* Lockstep: every process of the group takes part in every collective, also
  with an empty batch (zero counts), so collectives never pair up out of
  order; eval mode and ``using_bn=False`` need none at all.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from mmengine.registry import MODELS
from torch import Tensor, nn

from mmsn.ops.statistics import NONFINITE_POOLED, batch_stats_from_instance
from .switchable_norm import SwitchableNorm2d, _SwitchableNorm

# Layer class -> the class sync conversion turns it into; modules that
# define more layers (SSN) add theirs.
SYNC_VARIANTS = {}


def sync_variant(cls: type) -> type:
    """The synchronized class for an SN layer class (the closest base class
    registered in :data:`SYNC_VARIANTS`)."""
    for klass in cls.__mro__:
        if klass in SYNC_VARIANTS:
            return SYNC_VARIANTS[klass]
    raise TypeError(f'{cls.__name__} has no synchronized variant')


def _all_reduce_(tensor: Tensor, group, what: str) -> Tensor:
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as err:
        raise RuntimeError(
            f'SyncSwitchableNorm: the all-reduce of {what} over '
            f'{dist.get_world_size(group)} processes failed. Another process '
            f'of the group has probably exited or stopped calling the same '
            f'layers in the same order (every process must run the same '
            f'SyncSN layers, in training mode, each step). Cause: {err}'
        ) from err
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group, differentiable: the gradient of each process's
    input is the sum over processes of the gradients of the output (each
    process holds the gradient of its own loss)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_reduce_(tensor.clone(), group, 'the BN statistics')

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = _all_reduce_(grad.contiguous().clone(), ctx.group,
                            'the gradients of the BN statistics')
        return grad, None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Differentiable sum of ``tensor`` over the processes of ``group``."""
    return _AllReduceSum.apply(tensor, group or dist.group.WORLD)


def pooled_batch_stats(mean_in: Tensor, var_in: Tensor,
                       group=None) -> Tuple[Tensor, Tensor, Tensor]:
    """BN statistics of the batch joined over the processes of ``group``.

    Args:
        mean_in (Tensor): IN means (N, C) of this process's batch; N may be 0.
        var_in (Tensor): IN variances (N, C).
        group (ProcessGroup, optional): Defaults to the whole world.

    Returns:
        tuple: ``(mean, var, count)``: mean and variance (C,), differentiable
        through both all-reduces, and the joined number of samples.
    """
    c = mean_in.shape[1]
    count = mean_in.new_full((1, ), mean_in.shape[0])
    sums = all_reduce_sum(torch.cat([mean_in.sum(0), count]), group)
    count = sums[c].detach()
    mean = sums[:c] / count
    # centred on the joined mean, as batch_stats_from_instance does
    second = all_reduce_sum((var_in + (mean_in - mean).square()).sum(0),
                            group)
    return mean, second / count, count


class SyncSwitchableNorm(SwitchableNorm2d):
    """Switchable Normalization with BN statistics pooled across processes.

    Works on any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU);
    without an initialized process group, or in a group of one, it behaves
    like :class:`SwitchableNorm2d`. Accepts 2D to 5D input. In training with
    the BN branch, every process of the group must call the layer each step
    (with an empty batch if it has no samples: it then contributes nothing
    and gets the pooled running statistics).

    Args:
        process_group (ProcessGroup, optional): Group to pool over.
            Defaults to the whole world. A process outside the group
            normalizes with its own batch.
        **kwargs: See :class:`_SwitchableNorm`.
    """

    def __init__(self, num_features: int, *args, process_group=None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group
        # the joined batch's size (a device scalar) while a forward pools
        self._pooled_count: Optional[Tensor] = None

    _input_dims = (2, 3, 4, 5)

    def _pools(self) -> bool:
        """Whether this call pools the BN statistics across processes."""
        return (self.training and self.using_bn and dist.is_available()
                and dist.is_initialized() and dist.get_world_size(
                    self.process_group or dist.group.WORLD) > 1)

    def _pools_locally(self) -> bool:
        return not self._pools()

    def _uses_layer_ops(self) -> bool:
        return not self._pools()

    def _reduce_batch_stats(self, mean_in, var_in):
        if not self._pools():
            return batch_stats_from_instance(mean_in, var_in)
        mean, var, self._pooled_count = pooled_batch_stats(
            mean_in, var_in, self.process_group)
        return mean, var

    def _nonfinite_slot(self, mean_in: Tensor) -> Tensor:
        local = super()._nonfinite_slot(mean_in)
        if self._pooled_count is None:
            return local
        # this process's input finite (or empty): the others' was not; no
        # process had a sample: nothing to learn from, nothing to count
        slot = torch.where(torch.isfinite(mean_in).all(), NONFINITE_POOLED,
                           local)
        return torch.where(self._pooled_count.reshape(()) == 0, -1, slot)

    def forward(self, x: Tensor) -> Tensor:
        try:
            if x.numel() == 0 and self._pools():
                self._check_input_dim(x)
                return self._forward_empty(x)
            return super().forward(x)
        finally:
            self._pooled_count = None

    def _forward_empty(self, x: Tensor) -> Tensor:
        """Take part in the collectives with zero counts; the output is as
        empty as the input."""
        # (0, C), in x's graph: backward then reaches the all-reduces as it
        # does on the other processes (only if x needs a gradient, as there)
        rows = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)
        # in double, as the other processes' functional core pools
        no_rows = rows[:0].sum(2).double()
        pooled = self._train_batch_stats(no_rows, no_rows)
        y = self._empty_output(x, *pooled)
        self._nonfinite_report.poll(type(self).__name__, self.nonfinite,
                                    x.dtype)
        return y

    @classmethod
    def convert_sync_switchable_norm(cls, module: nn.Module,
                                     process_group=None) -> nn.Module:
        """Replace every SN layer in ``module`` by its synchronized variant
        (SyncSN; SyncSSN for SSN), which takes over the layer's own
        parameters and buffers (the same tensors, as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: an optimizer built
        before the conversion keeps training them).
        """
        output = module
        if isinstance(module, _SwitchableNorm) and not isinstance(
                module, SyncSwitchableNorm):
            like = next(module.parameters())
            output = sync_variant(type(module))(
                module.num_features,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                using_bn=module.using_bn,
                moving_average=module.moving_average,
                unbiased=module.unbiased,
                last_gamma=module.last_gamma,
                process_group=process_group,
                device=like.device,
                dtype=like.dtype)
            for name, param in module.named_parameters(recurse=False):
                setattr(output, name, param)
            for name, buf in module.named_buffers(recurse=False):
                output.register_buffer(
                    name, buf,
                    persistent=name not in module._non_persistent_buffers_set)
            output.train(module.training)
            return output
        for name, child in module.named_children():
            output.add_module(
                name, cls.convert_sync_switchable_norm(child, process_group))
        return output


SYNC_VARIANTS[_SwitchableNorm] = SyncSwitchableNorm
MODELS.register_module('SyncSN', module=SyncSwitchableNorm)
