"""Fill SN's batch-average statistics after training, with weights frozen."""
import itertools
from typing import List, Optional

import torch
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsn.models.norms.switchable_norm import _SwitchableNorm


def batch_average_layers(model: nn.Module) -> List[_SwitchableNorm]:
    """SN layers with a BN branch in batch-average mode."""
    return [
        m for m in model.modules() if isinstance(m, _SwitchableNorm)
        and m.using_bn and not m.moving_average
    ]


@torch.no_grad()
def fill_batch_average(model: nn.Module,
                       loader,
                       num_iters: int,
                       logger='current') -> int:
    """Recompute the running statistics of batch-average SN layers.

    The statistics are reset and pooled over ``num_iters`` training batches
    (the authors' ``using_moving_average=False`` recipe), with the model in
    training mode and every parameter untouched. Running statistics of other
    norm layers are restored afterwards, so only the batch-average SN layers
    change.

    Returns:
        int: The number of batches used.
    """
    if is_model_wrapper(model):
        model = model.module
    layers = batch_average_layers(model)
    if not layers:
        print_log('No batch-average SN layer found', logger=logger)
        return 0
    others = [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        and not any(m is layer for layer in layers)
    ]
    saved = [{k: v.clone()
              for k, v in m.state_dict().items() if 'running' in k
              or k == 'num_batches_tracked'} for m in others]
    was_training = model.training
    model.train()
    for layer in layers:
        layer.reset_running_stats()
    used = 0
    for data in itertools.islice(loader, num_iters):
        data = model.data_preprocessor(data, True)
        model(**data, mode='tensor')
        used += 1
    for module, state in zip(others, saved):
        module.load_state_dict(state, strict=False)
    model.train(was_training)
    print_log(
        f'Batch-average statistics of {len(layers)} SN layers filled from '
        f'{used} batches', logger=logger)
    return used


@HOOKS.register_module()
class SNBatchAverageHook(Hook):
    """Fill batch-average SN statistics with the weights frozen.

    SN layers built with ``moving_average=False`` pool their BN statistics
    over every training batch since the last reset. This hook resets them and
    pools them over ``num_samples`` training samples after every
    ``interval`` epochs (or iterations for an iteration-based loop), so that
    validation, test and the saved checkpoint use statistics of the final
    weights. For moving-average SN, mmpretrain's ``PreciseBNHook`` works as
    with BN.

    Args:
        num_samples (int): Samples (over all processes) to pool.
            Defaults to 8192.
        interval (int): Epochs (or iterations) between fills. Defaults to 1.
    """
    priority = 'ABOVE_NORMAL'

    def __init__(self, num_samples: int = 8192, interval: int = 1) -> None:
        if num_samples <= 0 or interval <= 0:
            raise ValueError(
                f'num_samples and interval must be positive, got '
                f'{num_samples} and {interval}')
        self.num_samples = num_samples
        self.interval = interval

    def _fill(self, runner) -> None:
        loader = runner.train_loop.dataloader
        _, world_size = get_dist_info()
        num_iters = max(1, self.num_samples // (loader.batch_size * world_size))
        fill_batch_average(runner.model, loader, min(num_iters, len(loader)),
                           runner.logger)

    def after_train_epoch(self, runner) -> None:
        if isinstance(runner.train_loop, EpochBasedTrainLoop) and \
                self.every_n_epochs(runner, self.interval):
            self._fill(runner)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        if isinstance(runner.train_loop, IterBasedTrainLoop) and \
                self.every_n_train_iters(runner, self.interval):
            self._fill(runner)
