"""Turn SSN (and near one-hot SN) layers into the normalization they picked.

A trained SSN layer mixes with one-hot shares: its mean is exactly the IN,
LN or BN mean and its variance exactly one of the three variances. At
inference it is therefore the plain normalization
:class:`mmsn_runtime.CollapsedNorm` with those picks (all nine combinations;
BN for both is a frozen affine map). An SN layer is only close to that when
its softmax shares are close to one-hot; it is collapsed only when the
caller accepts a tolerance, and the change of the outputs is the price.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
from mmengine.model import is_model_wrapper
from torch import nn

from mmsn.models.norms.sparse_switchable_norm import _SparseSwitchableNorm
from mmsn.models.norms.switchable_norm import _SwitchableNorm
from mmsn_runtime import BRANCHES, CollapsedNorm


class CollapseError(ValueError):
    """A model cannot be collapsed as asked."""


@dataclass
class LayerPick:
    """What one SN/SSN layer becomes.

    Args:
        name (str): Module name.
        sparse (bool): An SSN layer (else SN).
        mean (str): Branch of the mean (``'IN'``, ``'LN'`` or ``'BN'``).
        var (str): Branch of the variance.
        distance (float): Largest distance of a share from one-hot
            (``1 - max share`` over the two vectors); 0 for a trained SSN.
        collapse (bool): Whether it is within the accepted distance.
    """
    name: str
    sparse: bool
    mean: str
    var: str
    distance: float
    collapse: bool


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def plan_collapse(model: nn.Module,
                  sn_tolerance: Optional[float] = None) -> List[LayerPick]:
    """The pick of every SN/SSN layer of ``model`` and whether it collapses.

    An SSN layer collapses when its shares are one-hot, an SN layer only
    when ``sn_tolerance`` is given and every share is within it of one-hot
    (``1 - max share <= sn_tolerance``); the tolerance also admits SSN
    layers whose schedule did not finish.
    """
    if sn_tolerance is not None and not 0 <= sn_tolerance < 1:
        raise CollapseError(
            f'sn_tolerance must be in [0, 1), got {sn_tolerance}')
    picks = []
    for name, module in _unwrap(model).named_modules():
        if not isinstance(module, _SwitchableNorm):
            continue
        mean, var = module.importance()
        distance = max(1 - mean.max().item(), 1 - var.max().item())
        sparse = isinstance(module, _SparseSwitchableNorm)
        limit = sn_tolerance if sn_tolerance is not None else (
            0.0 if sparse else -1.0)
        picks.append(
            LayerPick(name, sparse, BRANCHES[int(mean.argmax())],
                      BRANCHES[int(var.argmax())], distance,
                      distance <= limit))
    return picks


def refusal(picks: List[LayerPick]) -> Optional[str]:
    """Why the layers that do not collapse cannot (None if all do)."""
    left = [p for p in picks if not p.collapse]
    if not left:
        return None
    lines = [
        f'  {p.name} ({"SSN" if p.sparse else "SN"}): shares up to '
        f'{p.distance:.3g} from one-hot' for p in left
    ]
    needed = max(p.distance for p in left)
    return (f'{len(left)} of {len(picks)} layers do not collapse:\n' +
            '\n'.join(lines) +
            f'\nSSN layers collapse once one-hot (train through the radius '
            f'schedule); SN layers only with --sn-tolerance T, and T >= '
            f'{needed:.3g} would take all of these (at a price in the '
            f'outputs, which the tool prints).')


def collapsed_norm(layer: _SwitchableNorm, mean: str,
                   var: str) -> CollapsedNorm:
    """A :class:`CollapsedNorm` computing what ``layer`` does in eval mode
    with one-hot shares at ``mean`` and ``var``."""
    norm = CollapsedNorm(
        layer.num_features,
        eps=layer.eps,
        unbiased=layer.unbiased,
        sources=(mean, var))
    with torch.no_grad():
        if layer.affine:
            norm.weight.copy_(layer.weight)
            norm.bias.copy_(layer.bias)
        if layer.using_bn:
            norm.running_mean.copy_(layer.running_mean)
            norm.running_var.copy_(layer.running_var)
    return norm.to(layer.weight.device if layer.affine else None).eval()


def collapse_model(model: nn.Module,
                   sn_tolerance: Optional[float] = None) -> List[LayerPick]:
    """Replace, in place, every SN/SSN layer of ``model`` by the
    :class:`CollapsedNorm` it picked (under the same module name).

    Nothing changes unless every layer collapses (see
    :func:`plan_collapse`); otherwise :class:`CollapseError` says which do
    not.
    """
    picks = plan_collapse(model, sn_tolerance)
    reason = refusal(picks)
    if reason:
        raise CollapseError(reason)
    by_name = {p.name: p for p in picks}
    root = _unwrap(model)
    for parent_name, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            full = f'{parent_name}.{name}' if parent_name else name
            if full in by_name:
                pick = by_name[full]
                parent._modules[name] = collapsed_norm(
                    child, pick.mean, pick.var)
    return picks
