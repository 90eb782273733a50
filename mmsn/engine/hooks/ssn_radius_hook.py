"""The SparsestMax radius schedule of Sparse Switchable Normalization."""
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from mmsn.models.norms.sparse_switchable_norm import _SparseSwitchableNorm


def ssn_layers(model: nn.Module) -> List[_SparseSwitchableNorm]:
    """Every SSN layer of ``model`` (unwrapped from DDP-style wrappers)."""
    if is_model_wrapper(model):
        model = model.module
    return [m for m in model.modules() if isinstance(m, _SparseSwitchableNorm)]


@HOOKS.register_module()
class SSNRadiusHook(Hook):
    """Grow the SparsestMax radius of every SSN layer linearly over training.

    Before each training iteration the radius of every SSN layer is set to
    ``iteration / total_iterations`` (0 at the first iteration), as in the
    SSN paper; past ``sqrt(2/3)`` (three branches) or ``sqrt(1/2)`` (two)
    every share vector is one-hot, so every layer has picked its norms well
    before the last iteration. The radius is a buffer of each layer, so
    checkpoints hold it and a resumed run continues the schedule.

    After each iteration the one-hot vectors of frozen layers are written
    back into their parameters, so that checkpoints store them exactly
    (momentum would otherwise move them until the next forward restores
    them).
    """
    priority = 'NORMAL'

    def __init__(self) -> None:
        self._layers: List[_SparseSwitchableNorm] = []

    def before_train(self, runner) -> None:
        self._layers = ssn_layers(runner.model)
        if not self._layers:
            runner.logger.warning(
                'SSNRadiusHook: the model has no SSN layer; nothing to do')

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        radius = runner.iter / runner.max_iters
        for layer in self._layers:
            layer.radius.fill_(radius)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        for layer in self._layers:
            layer.restore_frozen_()
