"""Switchable Normalization layers (Luo et al., ICLR 2019).

The base class holds the state (gamma, beta, importance logits, BN running
statistics); the 1d/2d/3d subclasses only check the input's rank, as in
``torch.nn.modules.batchnorm``. It derives from ``_BatchNorm`` so that
OpenMMLab treats SN as a norm layer everywhere BN is special-cased
(``norm_eval``, ``norm_decay_mult``, ``PreciseBNHook``, init by layer type);
``mmsn.utils.compat`` keeps the BN-only tools (sync conversion, conv fusion)
from silently turning it into BN.
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsn.ops.switchable_norm import batch_stats_from_instance, mixed_norm


# The default momentum depends on the arity (as in the authors' layers), and
# momentum=None must stay expressible (cumulative average, as in BN).
_ARITY_DEFAULT = object()


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

    def _batch_stats(self):
        """What the functional core mixes in as BN statistics: this batch's
        (a function of the IN ones) in training, the running ones in eval.
        """
        if not self.using_bn:
            return None
        if not self.training:
            return self.running_mean, self.running_var
        return self._train_batch_stats

    def _train_batch_stats(self, mean_in: Tensor, var_in: Tensor):
        mean_bn, var_bn = self._reduce_batch_stats(mean_in, var_in)
        self._update_running_stats(mean_bn.detach(), var_bn.detach())
        return mean_bn, var_bn

    @torch.no_grad()
    def _update_running_stats(self, mean_bn: Tensor, var_bn: Tensor) -> None:
        # one host sync per layer: the check needs a Python bool to warn
        finite = torch.isfinite(mean_bn).all() & torch.isfinite(var_bn).all()
        if not finite:
            warnings.warn(
                f'{type(self).__name__}: non-finite batch statistics (NaN or '
                f'Inf in the input); running statistics keep their last '
                f'value.', RuntimeWarning, stacklevel=4)
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
        if x.shape[0] == 0 or x[0, 0].numel() == 0:
            # Nothing to normalize; keep the output attached to the graph.
            return x * 0 if not self.affine else \
                x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            mean_share, var_share = self._forward_shares(dtype)
        return mixed_norm(x, self.weight, self.bias, mean_share, var_share,
                          self._batch_stats(), self.eps, self.unbiased)

    @classmethod
    def _sync_variant(cls) -> type:
        """The class that sync conversion turns this layer into."""
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


class SyncSwitchableNorm(SwitchableNorm2d):
    """Switchable Normalization with BN statistics pooled across processes.

    Works on any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU);
    without an initialized process group it behaves like
    :class:`SwitchableNorm2d`. Accepts 2D to 5D input.

    Args:
        process_group (ProcessGroup, optional): Group to pool over.
            Defaults to the whole world.
        **kwargs: See :class:`_SwitchableNorm`.
    """

    def __init__(self, num_features: int, *args, process_group=None,
                 **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _expected_dims(self):
        return (2, 3, 4, 5)

    def _reduce_batch_stats(self, mean_in, var_in):
        if not (dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return batch_stats_from_instance(mean_in, var_in)
        from torch.distributed.nn.functional import all_reduce
        c = mean_in.shape[1]
        count = mean_in.new_full((1, ), mean_in.shape[0])
        packed = torch.cat(
            [mean_in.sum(0), (var_in + mean_in.square()).sum(0), count])
        packed = all_reduce(packed, group=self.process_group or
                            dist.group.WORLD)
        total = packed[-1]
        mean_bn = packed[:c] / total
        var_bn = packed[c:2 * c] / total - mean_bn.square()
        return mean_bn, var_bn.clamp_min(0)

    @classmethod
    def convert_sync_switchable_norm(cls, module: nn.Module,
                                     process_group=None) -> nn.Module:
        """Replace every SN layer in ``module`` by its synchronized variant
        (SyncSN; SyncSSN for SSN) with its state.
        """
        output = module
        if isinstance(module, _SwitchableNorm) and not isinstance(
                module, SyncSwitchableNorm):
            output = module._sync_variant()(
                module.num_features,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                using_bn=module.using_bn,
                moving_average=module.moving_average,
                unbiased=module.unbiased,
                last_gamma=module.last_gamma,
                process_group=process_group)
            output.load_state_dict(module.state_dict())
            output.to(next(module.parameters()).device)
            output.train(module.training)
            for name, param in module.named_parameters():
                getattr(output, name).requires_grad_(param.requires_grad)
            return output
        for name, child in module.named_children():
            output.add_module(
                name, cls.convert_sync_switchable_norm(child, process_group))
        return output


MODELS.register_module('SN', module=SwitchableNorm2d)
MODELS.register_module('SN1d', module=SwitchableNorm1d)
MODELS.register_module('SN2d', module=SwitchableNorm2d)
MODELS.register_module('SN3d', module=SwitchableNorm3d)
MODELS.register_module('SyncSN', module=SyncSwitchableNorm)
