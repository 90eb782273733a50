"""Switchable Normalization layers (Luo et al., ICLR 2019).

The base class holds the state (gamma, beta, importance logits, BN running
statistics); the 1d/2d/3d subclasses only check the input's rank, as in
``torch.nn.modules.batchnorm``. It derives from ``_BatchNorm`` so that
OpenMMLab treats SN as a norm layer everywhere BN is special-cased
(``norm_eval``, ``norm_decay_mult``, ``PreciseBNHook``, init by layer type);
``mmsn.utils.compat`` keeps the BN-only tools (sync conversion, conv fusion)
from silently turning it into BN.
"""
from typing import Optional, Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsn.ops._capture import capturing_graph
from mmsn.ops.statistics import (NONFINITE_SLOTS, PooledBatchStats,
                                 nonfinite_slot, stats_dtype,
                                 update_running_stats_)
from mmsn.ops.library import layer_ops
from mmsn.ops.switchable_norm import (autocast_off, batch_stats_from_instance,
                                      layer_ops_for, mixed_norm)
from .arguments import ARITY_DEFAULT, check_arguments, public_signature
from .nonfinite import NonFiniteReport
from .recompute import recomputing_in_backward


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
    # Under torch.compile, traced as the layer operators (the eager kernels,
    # opaque to inductor): for a ResNet-50 on the CPU as fast as plain ops in
    # a training step, faster in eval, compiled in a quarter of the time, and
    # the eager numbers (benchmark_norm.py --sections compile).
    _compile_as_layer_ops = True

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = ARITY_DEFAULT,
                 affine: bool = True,
                 using_bn: bool = True,
                 moving_average: bool = True,
                 unbiased: bool = True,
                 last_gamma: bool = False,
                 requires_grad: bool = True,
                 device=None,
                 dtype=None) -> None:
        if momentum is ARITY_DEFAULT:
            momentum = self._default_momentum
        flags = dict(affine=affine, using_bn=using_bn,
                     moving_average=moving_average, unbiased=unbiased,
                     last_gamma=last_gamma, requires_grad=requires_grad)
        check_arguments(num_features, eps, momentum, flags)
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
        # batches that could not move the running statistics, counted on
        # the device (see .nonfinite); not part of the checkpoint
        self.register_buffer(
            'nonfinite',
            torch.zeros(NONFINITE_SLOTS, dtype=torch.long, device=device),
            persistent=False)
        self._nonfinite_report = NonFiniteReport()
        # the kernels load (or compile, once per machine) with the first
        # layer built, so that torch.compile, which must not trace the
        # loading, finds them
        layer_ops()
        self.reset_parameters()
        for param in self.parameters():
            param.requires_grad_(requires_grad)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = public_signature(cls, _SwitchableNorm)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, 'mean_weight'):
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)
        if self.affine and getattr(self, 'last_gamma', False):
            nn.init.zeros_(self.weight)

    # -- input checks -------------------------------------------------------
    _input_dims: Tuple[int, ...] = ()  # the ranks a subclass accepts

    def _check_input_dim(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f'{type(self).__name__} expects a floating-point '
                            f'input, got {x.dtype}')
        if x.dim() not in self._input_dims:
            shapes = ' or '.join(f'{d}D' for d in self._input_dims)
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

    def _batch_stats(self):
        """What the functional core mixes in as BN statistics: this batch's
        (a function of the IN ones) in training, the running ones in eval.
        """
        if not self.using_bn:
            return None
        if not self.training:
            return self.running_mean, self.running_var
        if self._pools_locally():
            # the functional core pools them itself (no graph to build)
            return PooledBatchStats(self._observe_batch_stats)
        return self._train_batch_stats

    def _pools_locally(self) -> bool:
        """Whether the BN statistics are this process's batch alone (SyncSN
        pools across processes)."""
        return True

    def _train_batch_stats(self, mean_in: Tensor, var_in: Tensor):
        mean_bn, var_bn = self._reduce_batch_stats(mean_in, var_in)
        self._observe_batch_stats(mean_bn.detach(), var_bn.detach(),
                                  mean_in.detach())
        return mean_bn, var_bn

    def _observe_batch_stats(self, mean_bn: Tensor, var_bn: Tensor,
                             mean_in: Tensor) -> None:
        """This training batch's BN statistics (detached) and the IN means
        they came from: they move the running ones, once per step."""
        if not recomputing_in_backward():
            update_running_stats_(self.running_mean, self.running_var,
                                  self.num_batches_tracked, self.nonfinite,
                                  mean_bn, var_bn,
                                  self._nonfinite_slot(mean_in),
                                  self.momentum, self.moving_average)

    def _nonfinite_slot(self, mean_in: Tensor) -> Tensor:
        """Where a batch with non-finite BN statistics is counted."""
        return nonfinite_slot(mean_in)

    def report_nonfinite(self, blocking: bool = False) -> None:
        """Warn about batches whose statistics were not finite since the
        last report (see :mod:`.nonfinite`). Called after every eager
        forward (it reads only what has arrived without waiting) and, with
        ``blocking=True``, when the layer switches between training and
        eval."""
        self._nonfinite_report.poll(type(self).__name__, self.nonfinite,
                                    blocking=blocking)

    def train(self, mode: bool = True):
        if mode != self.training:
            self.report_nonfinite(blocking=True)
        return super().train(mode)

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

    def _op_weights(self, ops) -> Tuple[Tensor, Tensor, bool]:
        """What the layer operators mix with: the importance logits (the
        operator takes their softmax), or shares (False)."""
        params = self._parameters
        return params['mean_weight'], params['var_weight'], True

    def importance(self) -> Tuple[Tensor, Tensor]:
        """The shares of the means and the variances, [IN, LN(, BN)], as
        float32 tensors without gradient."""
        with torch.no_grad():
            return tuple(s.float() for s in self.shares())

    # -- forward -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.numel() == 0:  # C > 0 is checked: no samples or positions
            return self._empty_output(x)
        ops = layer_ops_for(x, self._compile_as_layer_ops) \
            if self._uses_layer_ops() else None
        if ops is None:
            y = self._forward_functional(x)
        else:
            y = self._forward_layer_ops(ops, x)
        if not torch.compiler.is_compiling():
            self._nonfinite_report.poll(type(self).__name__,
                                        self._buffers['nonfinite'], x.dtype)
        return y

    def _uses_layer_ops(self) -> bool:
        """Whether this call may run as one of mmsn's layer operators
        (SyncSN's pooling runs between its passes, so it cannot)."""
        return True

    def _forward_layer_ops(self, ops, x: Tensor) -> Tensor:
        mean_weight, var_weight, softmax = self._op_weights(ops)
        # the dictionaries, not Module.__getattr__ (~1 us per name): this
        # call costs the host about what a BatchNorm call does
        params, buffers = self._parameters, self._buffers
        if self.training:
            return ops.switchable_norm_train(
                x, params['weight'], params['bias'], mean_weight, var_weight,
                buffers['running_mean'], buffers['running_var'],
                buffers['num_batches_tracked'], buffers['nonfinite'],
                softmax, self.momentum, self.moving_average, self.eps,
                self.unbiased, not recomputing_in_backward())[0]
        return ops.switchable_norm_eval(
            x, params['weight'], params['bias'], mean_weight, var_weight,
            buffers['running_mean'], buffers['running_var'],
            buffers['nonfinite'], softmax, self.eps, self.unbiased)[0]

    def _forward_functional(self, x: Tensor) -> Tensor:
        """Through the functional core: where no layer operator applies
        (tracing and export, a forced path, no mmsn._C, SyncSN)."""
        # Shares in double, as the layer operators take them, so that the
        # softmax's backward (a difference of the shares' gradients, which
        # are large for inputs with a large mean) keeps its precision; a
        # tracer records the statistics' dtype (exporters lack float64).
        dtype = stats_dtype(x.dtype) if capturing_graph() else torch.float64
        with autocast_off(x.device):
            mean_share, var_share = self._forward_shares(dtype)
        return mixed_norm(x, self.weight, self.bias, mean_share, var_share,
                          self._batch_stats(), self.eps, self.unbiased)

    def _empty_output(self, x: Tensor, *tied: Tensor) -> Tensor:
        """The output for an input without elements: as empty, but in the
        graph of x, of every parameter (with zero gradients, so that DDP
        finds each parameter used, as on a process with data) and of
        ``tied``."""
        zero = sum(t.sum() for t in (*self.parameters(), *tied)) * 0
        return x * 0 + zero.to(x.dtype)

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

    _input_dims = (2, 3)


class SwitchableNorm2d(_SwitchableNorm):
    """Switchable Normalization over a 4D (N, C, H, W) input.

    Default momentum 0.1 (the authors' 0.9). See :class:`_SwitchableNorm`
    for the arguments.
    """
    _default_momentum = 0.1

    _input_dims = (4, )


class SwitchableNorm3d(_SwitchableNorm):
    """Switchable Normalization over a 5D (N, C, D, H, W) input.

    Default momentum 0.003 (the authors' 0.997). See
    :class:`_SwitchableNorm` for the arguments.
    """
    _default_momentum = 0.003

    _input_dims = (5, )


MODELS.register_module('SN', module=SwitchableNorm2d)
MODELS.register_module('SN1d', module=SwitchableNorm1d)
MODELS.register_module('SN2d', module=SwitchableNorm2d)
MODELS.register_module('SN3d', module=SwitchableNorm3d)
