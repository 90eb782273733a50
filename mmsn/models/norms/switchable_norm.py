"""Switchable Normalization layers (Luo et al., ICLR 2019).

The base class holds the state (gamma, beta, importance logits, BN running
statistics); the 1d/2d/3d subclasses only check the input's rank, as in
``torch.nn.modules.batchnorm``. It derives from ``_BatchNorm`` so that
OpenMMLab treats SN as a norm layer everywhere BN is special-cased
(``norm_eval``, ``norm_decay_mult``, ``PreciseBNHook``, init by layer type);
``mmsn.utils.compat`` keeps the BN-only tools (sync conversion, conv fusion)
from silently turning it into BN.
"""
import functools
import math
import numbers
import warnings
from typing import Optional, Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsn.ops.statistics import PooledBatchStats, stats_dtype
from mmsn.ops.switchable_norm import (autocast_off, batch_stats_from_instance,
                                      mixed_norm)


# The default momentum depends on the arity (as in the authors' layers), and
# momentum=None must stay expressible (cumulative average, as in BN).
_ARITY_DEFAULT = object()


def _check_arguments(num_features, eps, momentum, flags: dict) -> None:
    """Refuse what BN would silently accept (a string flag is truthy, a
    negative eps gives NaN), naming the argument."""
    if isinstance(num_features, bool) or not isinstance(
            num_features, numbers.Integral):
        raise TypeError(f'num_features must be a positive int, got '
                        f'{num_features!r} ({type(num_features).__name__})')
    if num_features <= 0:
        raise ValueError(
            f'num_features must be a positive int, got {num_features}')
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f'eps must be a positive float, got {eps!r} '
                        f'({type(eps).__name__})')
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f'eps must be a positive finite float, got {eps}')
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(
                momentum, numbers.Real):
            raise TypeError(f'momentum must be a float in [0, 1] or None, '
                            f'got {momentum!r} ({type(momentum).__name__})')
        if not 0 <= momentum <= 1:
            raise ValueError(
                f'momentum must be in [0, 1] or None, got {momentum}')
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f'{name} must be True or False, got {value!r} '
                            f'({type(value).__name__})')


def _recomputing_in_backward() -> bool:
    """Whether this forward is activation checkpointing's recomputation.

    ``torch.utils.checkpoint`` (reentrant or not) reruns the forward inside
    the backward pass; the running statistics were already updated by the
    first forward and must not move twice per step.
    """
    return torch._C._current_graph_task_id() != -1


class _SwitchableNorm(_BatchNorm):
    """Base of the Switchable Normalization layers.

    Args:
        num_features (int): Number of channels C of the (N, C, ...) input.
        eps (float): Added to the mixed variance. Defaults to 1e-5.
        momentum (float, optional): PyTorch convention:
            ``running = (1 - momentum) * running + momentum * batch``.
            The authors' 0.9 (2d) is 0.1 here, their 0.997 (1d/3d) is 0.003;
            these are the defaults. None gives a cumulative average, as in
            ``nn.BatchNorm2d``.
        affine (bool): Learn a per-channel gamma and beta. Defaults to True.
        using_bn (bool): Include the BN branch (and its running statistics).
            False mixes IN and LN only, the paper's setting for one sample
            per GPU. Defaults to True.
        moving_average (bool): True updates the running statistics as an
            exponential moving average. False is the authors'
            ``using_moving_average=False`` ("batch average"): the running
            statistics pool every batch seen since the last
            ``reset_running_stats()`` (mean of the batch means, mean of the
            batch second moments minus its square), so they can be filled
            after training with the weights frozen. Defaults to True.
        unbiased (bool): Unbiased IN variance (divide by HW - 1), as in the
            authors' implementation and their checkpoints. False gives the
            paper's biased estimator. Defaults to True.
        last_gamma (bool): Initialize gamma to 0 (for the last norm of a
            residual block). Defaults to False.
        requires_grad (bool): Whether the parameters are trained.
            Defaults to True.
    """
    _abbr_ = 'sn'
    _default_momentum = 0.1

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = _ARITY_DEFAULT,
                 affine: bool = True,
                 using_bn: bool = True,
                 moving_average: bool = True,
                 unbiased: bool = True,
                 last_gamma: bool = False,
                 requires_grad: bool = True,
                 device=None,
                 dtype=None) -> None:
        if momentum is _ARITY_DEFAULT:
            momentum = self._default_momentum
        flags = dict(affine=affine, using_bn=using_bn,
                     moving_average=moving_average, unbiased=unbiased,
                     last_gamma=last_gamma, requires_grad=requires_grad)
        _check_arguments(num_features, eps, momentum, flags)
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=using_bn,
            device=device,
            dtype=dtype)
        self.using_bn = using_bn
        self.moving_average = moving_average
        self.unbiased = unbiased
        self.last_gamma = last_gamma
        num_branches = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(
            torch.ones(num_branches, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(
            torch.ones(num_branches, device=device, dtype=dtype))
        self.reset_parameters()
        for param in self.parameters():
            param.requires_grad_(requires_grad)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, 'mean_weight'):
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)
        if self.affine and getattr(self, 'last_gamma', False):
            nn.init.zeros_(self.weight)

    # -- input checks -------------------------------------------------------
    def _expected_dims(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def _check_input_dim(self, x: Tensor) -> None:
        dims = self._expected_dims()
        if x.dim() not in dims:
            shapes = ' or '.join(f'{d}D' for d in dims)
            raise ValueError(
                f'{type(self).__name__} expects a {shapes} input '
                f'(N, C, ...), got a {x.dim()}D input of shape '
                f'{tuple(x.shape)}')
        if x.shape[1] != self.num_features:
            raise ValueError(
                f'{type(self).__name__} was built for {self.num_features} '
                f'channels, got an input with {x.shape[1]} channels '
                f'(shape {tuple(x.shape)})')

    # -- statistics ---------------------------------------------------------
    def _reduce_batch_stats(self, mean_in: Tensor,
                            var_in: Tensor) -> Tuple[Tensor, Tensor]:
        """BN statistics of this batch; SyncSN pools them across processes.
        """
        return batch_stats_from_instance(mean_in, var_in)

    def _batch_stats(self, x: Optional[Tensor] = None):
        """What the functional core mixes in as BN statistics: this batch's
        (a function of the IN ones) in training, the running ones in eval.
        ``x``, the input, only serves to explain non-finite statistics.
        """
        if not self.using_bn:
            return None
        if not self.training:
            return self.running_mean, self.running_var
        if self._pools_locally():
            # the functional core pools them itself (no graph to build)
            return PooledBatchStats(
                functools.partial(self._observe_batch_stats, source=x))
        return functools.partial(self._train_batch_stats, source=x)

    def _pools_locally(self) -> bool:
        """Whether the BN statistics are this process's batch alone (SyncSN
        pools across processes)."""
        return True

    def _train_batch_stats(self, mean_in: Tensor, var_in: Tensor,
                           source: Optional[Tensor] = None):
        mean_bn, var_bn = self._reduce_batch_stats(mean_in, var_in)
        self._observe_batch_stats(mean_bn.detach(), var_bn.detach(), source)
        return mean_bn, var_bn

    def _observe_batch_stats(self, mean_bn: Tensor, var_bn: Tensor,
                             source: Optional[Tensor] = None) -> None:
        """This training batch's BN statistics (detached): they move the
        running ones, once per step."""
        if not _recomputing_in_backward():
            self._update_running_stats(mean_bn, var_bn, source)

    def _non_finite_reason(self, source: Optional[Tensor],
                           stats_dtype: torch.dtype
                           ) -> Optional[Tuple[str, str]]:
        """Why the batch statistics are not finite, and what to do (None:
        say nothing). Runs only once they are found non-finite, so it may
        be slow."""
        dtype = str(stats_dtype).replace('torch.', '')
        if source is None:
            return (f'non-finite batch statistics (NaN or Inf in the input, '
                    f'or statistics beyond {dtype})', '')
        if not torch.isfinite(source).all():
            return 'non-finite batch statistics (NaN or Inf in the input)', ''
        largest = float(source.detach().abs().max())
        limit = math.sqrt(torch.finfo(stats_dtype).max)
        return (f'the batch statistics overflowed {dtype} although the '
                f'input is finite (largest |x| = {largest:.3g}; squared '
                f'deviations do not fit {dtype} beyond |x| ~ {limit:.2g}), '
                f'so the output does not normalize the input',
                ' Scale the input down or run this layer in float64.')

    @torch.no_grad()
    def _update_running_stats(self, mean_bn: Tensor, var_bn: Tensor,
                              source: Optional[Tensor] = None) -> None:
        # one host sync per layer: the check needs a Python bool to warn
        finite = torch.isfinite(mean_bn).all() & torch.isfinite(var_bn).all()
        if not finite:
            reason = self._non_finite_reason(source, var_bn.dtype)
            if reason is not None:
                what, advice = reason
                warnings.warn(
                    f'{type(self).__name__}: {what}; running statistics '
                    f'keep their last value.{advice}', RuntimeWarning,
                    stacklevel=4)
            return
        self.num_batches_tracked.add_(1)
        mean_bn = mean_bn.to(self.running_mean.dtype)
        var_bn = var_bn.to(self.running_var.dtype)
        if self.moving_average:
            factor = (1.0 / float(self.num_batches_tracked)
                      if self.momentum is None else self.momentum)
            self.running_mean.lerp_(mean_bn, factor)
            self.running_var.lerp_(var_bn, factor)
        else:
            factor = 1.0 / float(self.num_batches_tracked)
            second_moment = self.running_var + self.running_mean.square()
            second_moment.lerp_(var_bn + mean_bn.square(), factor)
            self.running_mean.lerp_(mean_bn, factor)
            self.running_var.copy_(
                (second_moment - self.running_mean.square()).clamp_min_(0))

    # -- importance shares -------------------------------------------------
    def shares(self,
               dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """Mixing shares of the means and of the variances on the simplex,
        [IN, LN(, BN)]: the softmax of the importance logits (SSN maps them
        by SparsestMax instead). Differentiable, computed in ``dtype``."""
        return (torch.softmax(self.mean_weight.to(dtype), 0),
                torch.softmax(self.var_weight.to(dtype), 0))

    def _forward_shares(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """The shares a forward mixes with; SSN also freezes one-hot ones
        there in training."""
        return self.shares(dtype)

    def importance(self) -> Tuple[Tensor, Tensor]:
        """The shares of the means and the variances, [IN, LN(, BN)], as
        float32 tensors without gradient."""
        with torch.no_grad():
            return tuple(s.float() for s in self.shares())

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.numel() == 0:  # C > 0 is checked: no samples or positions
            return self._empty_output(x)
        with autocast_off(x.device):
            mean_share, var_share = self._forward_shares(stats_dtype(x.dtype))
        return mixed_norm(x, self.weight, self.bias, mean_share, var_share,
                          self._batch_stats(x), self.eps, self.unbiased)

    def _empty_output(self, x: Tensor, *tied: Tensor) -> Tensor:
        """The output for an input without elements: as empty, but in the
        graph of x, of every parameter (with zero gradients, so that DDP
        finds each parameter used, as on a process with data) and of
        ``tied``."""
        zero = sum(t.sum() for t in (*self.parameters(), *tied)) * 0
        return x * 0 + zero.to(x.dtype)

    @classmethod
    def _sync_variant(cls) -> type:
        """The class that sync conversion turns this layer into."""
        from .sync_switchable_norm import SyncSwitchableNorm
        return SyncSwitchableNorm

    def extra_repr(self) -> str:
        return (f'{self.num_features}, eps={self.eps}, '
                f'momentum={self.momentum}, affine={self.affine}, '
                f'using_bn={self.using_bn}, '
                f'moving_average={self.moving_average}, '
                f'unbiased={self.unbiased}, last_gamma={self.last_gamma}')


class SwitchableNorm1d(_SwitchableNorm):
    """Switchable Normalization over a 2D (N, C) or 3D (N, C, L) input.

    For (N, C, L) input, IN statistics are over L. A (N, C) input has one
    position per instance, so its IN variance is 0 and LN/BN are pooled
    over C and N. (The authors' 1d layer instead mixes only LN and BN on
    (N, C) input.) Default momentum 0.003 (the authors' 0.997).
    See :class:`_SwitchableNorm` for the arguments.
    """
    _default_momentum = 0.003

    def _expected_dims(self):
        return (2, 3)


class SwitchableNorm2d(_SwitchableNorm):
    """Switchable Normalization over a 4D (N, C, H, W) input.

    Default momentum 0.1 (the authors' 0.9). See :class:`_SwitchableNorm`
    for the arguments.
    """
    _default_momentum = 0.1

    def _expected_dims(self):
        return (4, )


class SwitchableNorm3d(_SwitchableNorm):
    """Switchable Normalization over a 5D (N, C, D, H, W) input.

    Default momentum 0.003 (the authors' 0.997). See
    :class:`_SwitchableNorm` for the arguments.
    """
    _default_momentum = 0.003

    def _expected_dims(self):
        return (5, )


MODELS.register_module('SN', module=SwitchableNorm2d)
MODELS.register_module('SN1d', module=SwitchableNorm1d)
MODELS.register_module('SN2d', module=SwitchableNorm2d)
MODELS.register_module('SN3d', module=SwitchableNorm3d)
