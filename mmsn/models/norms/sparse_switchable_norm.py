"""Sparse Switchable Normalization layers (Shao et al., CVPR 2019).

SSN is SN with another map from the importance parameters to the mixing
shares: SparsestMax with a radius that grows from 0 to 1 over training
(:class:`mmsn.engine.SSNRadiusHook`), so each layer ends with exactly one of
IN, LN, BN for its mean and one for its variance. Statistics, running
statistics and the OpenMMLab integration are SN's (:class:`_SwitchableNorm`).

Freezing: in a training forward, a share vector that comes out one-hot is
stored as that one-hot vector into its parameter and flagged in
``mean_fixed`` / ``var_fixed``; from then on the layer mixes with the stored
vector and the parameter's gradient is zero. The parameter stays in the
graph (so DDP needs no ``find_unused_parameters``), and every training
forward writes the one-hot vector back, so neither momentum nor weight decay
can move it. All of it is tensor ops: no value is read back to the host.
"""
from typing import Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor

from mmsn.ops.sparsestmax import freeze_one_hot_, one_hot_argmax, sparsestmax
from .recompute import recomputing_in_backward
from .switchable_norm import _SwitchableNorm
from .sync_switchable_norm import SYNC_VARIANTS, SyncSwitchableNorm


class _SparseSwitchableNorm(_SwitchableNorm):
    """Base of the Sparse Switchable Normalization layers.

    Takes the arguments of :class:`_SwitchableNorm`; the default momentum is
    0.003 (the authors' SSN uses 0.997 in their convention, also in 2d).

    Buffers besides SN's: ``radius`` (float, (1,)), the SparsestMax radius,
    set by :class:`mmsn.engine.SSNRadiusHook`; ``mean_fixed`` and
    ``var_fixed`` (int64, (1,)), 1 once the vector is frozen one-hot.
    """
    _abbr_ = 'ssn'
    _default_momentum = 0.003
    # Traced as plain ops under torch.compile: the operators' freeze writes
    # the importance weights in place, which AOTAutograd cannot replay where
    # activation checkpointing recomputes the forward.
    _compile_as_layer_ops = False

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        device = self.mean_weight.device
        self.register_buffer('radius', torch.zeros(1, device=device))
        self.register_buffer('mean_fixed',
                             torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer('var_fixed',
                             torch.zeros(1, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, 'radius'):
            self.radius.zero_()
            self.mean_fixed.zero_()
            self.var_fixed.zero_()

    def _logits_and_fixed(self, dtype) -> Tuple[Tensor, Tensor]:
        logits = torch.stack([self.mean_weight, self.var_weight]).to(dtype)
        fixed = torch.stack([self.mean_fixed, self.var_fixed]).bool()
        return logits, fixed

    def shares(self,
               dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """SparsestMax shares of the means and of the variances at the
        current radius; a frozen vector gives its stored one-hot vector
        (without gradient)."""
        logits, fixed = self._logits_and_fixed(dtype)
        stored = one_hot_argmax(logits.detach())
        shares = torch.where(fixed, stored,
                             sparsestmax(logits, self.radius.to(dtype)))
        return shares[0], shares[1]

    def _forward_shares(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        mean_share, var_share = self.shares(dtype)
        if self.training:
            self._freeze_one_hot(mean_share, var_share)
        return mean_share, var_share

    def _op_weights(self, ops) -> Tuple[Tensor, Tensor, bool]:
        params, buffers = self._parameters, self._buffers
        mean_weight, var_weight = params['mean_weight'], params['var_weight']
        mean_fixed, var_fixed = buffers['mean_fixed'], buffers['var_fixed']
        mean_share, var_share, _ = ops.sparsestmax_shares(
            mean_weight, var_weight, buffers['radius'], mean_fixed,
            var_fixed)
        if self.training:
            ops.sparsestmax_freeze_(mean_weight, var_weight, mean_fixed,
                                    var_fixed, mean_weight.grad,
                                    var_weight.grad, mean_share, var_share)
        return mean_share, var_share, False

    def _forward_layer_ops(self, ops, x: Tensor) -> Tensor:
        # A traced graph keeps the shares and the freeze calls of their own
        # (forced by compile_with_layer_ops).
        if torch.compiler.is_compiling():
            return super()._forward_layer_ops(ops, x)
        # eager: one operator call, as SN's
        params, buffers = self._parameters, self._buffers
        mean_weight, var_weight = params['mean_weight'], params['var_weight']
        if not self.training:
            return ops.sparse_switchable_norm_eval(
                x, params['weight'], params['bias'], mean_weight, var_weight,
                buffers['radius'], buffers['mean_fixed'],
                buffers['var_fixed'], buffers['running_mean'],
                buffers['running_var'], buffers['nonfinite'], self.eps,
                self.unbiased)[0]
        return ops.sparse_switchable_norm_train(
            x, params['weight'], params['bias'], mean_weight, var_weight,
            buffers['radius'], buffers['mean_fixed'], buffers['var_fixed'],
            mean_weight.grad, var_weight.grad, buffers['running_mean'],
            buffers['running_var'], buffers['num_batches_tracked'],
            buffers['nonfinite'], self.momentum, self.moving_average,
            self.eps, self.unbiased, not recomputing_in_backward())[0]

    def _freeze_one_hot(self, mean_share: Tensor, var_share: Tensor) -> None:
        """Flag the vectors whose shares are one-hot and (re)write the one-hot
        vector into the parameters of every flagged vector."""
        for param, flag, share in ((self.mean_weight, self.mean_fixed,
                                    mean_share),
                                   (self.var_weight, self.var_fixed,
                                    var_share)):
            freeze_one_hot_(param, flag, param.grad, share)

    @torch.no_grad()
    def restore_frozen_(self) -> None:
        """Write the stored one-hot vectors back into the parameters of frozen
        vectors (undoes what an optimizer step did to them)."""
        _, fixed = self._logits_and_fixed(self.mean_weight.dtype)
        for i, param in enumerate((self.mean_weight, self.var_weight)):
            stored = one_hot_argmax(param)
            param.copy_(torch.where(fixed[i], stored, param))

    def extra_repr(self) -> str:
        return super().extra_repr() + ', sparsestmax'


class SparseSwitchableNorm1d(_SparseSwitchableNorm):
    """Sparse Switchable Normalization over a 2D (N, C) or 3D (N, C, L)
    input (see :class:`mmsn.SwitchableNorm1d` for the statistics and
    :class:`_SparseSwitchableNorm` for the arguments)."""

    _input_dims = (2, 3)


class SparseSwitchableNorm2d(_SparseSwitchableNorm):
    """Sparse Switchable Normalization over a 4D (N, C, H, W) input.

    Default momentum 0.003 (the authors' 0.997). See
    :class:`_SparseSwitchableNorm` for the arguments.
    """

    _input_dims = (4, )


class SparseSwitchableNorm3d(_SparseSwitchableNorm):
    """Sparse Switchable Normalization over a 5D (N, C, D, H, W) input."""

    _input_dims = (5, )


class SyncSparseSwitchableNorm(_SparseSwitchableNorm, SyncSwitchableNorm):
    """SSN with BN statistics pooled across processes (SyncSN's pooling).

    Accepts 2D to 5D input.

    Args:
        process_group (ProcessGroup, optional): Group to pool over.
            Defaults to the whole world.
        **kwargs: See :class:`_SparseSwitchableNorm`.
    """


SYNC_VARIANTS[_SparseSwitchableNorm] = SyncSparseSwitchableNorm
MODELS.register_module('SSN', module=SparseSwitchableNorm2d)
MODELS.register_module('SSN1d', module=SparseSwitchableNorm1d)
MODELS.register_module('SSN2d', module=SparseSwitchableNorm2d)
MODELS.register_module('SSN3d', module=SparseSwitchableNorm3d)
MODELS.register_module('SyncSSN', module=SyncSparseSwitchableNorm)
