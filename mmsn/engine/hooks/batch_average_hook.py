"""Fill SN's batch-average statistics after training, with weights frozen."""
import itertools
from typing import List, Optional

import torch
from mmengine.dist import all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmsn.models.norms import SyncSwitchableNorm
from mmsn.models.norms.switchable_norm import _SwitchableNorm


def batch_average_layers(model: nn.Module) -> List[_SwitchableNorm]:
    """SN layers with a BN branch in batch-average mode."""
    return [
        m for m in model.modules() if isinstance(m, _SwitchableNorm)
        and m.using_bn and not m.moving_average
    ]


def _pool_over_processes(layers: List[_SwitchableNorm]) -> None:
    """Give every process the statistics of all processes' batches, as one
    process pooling them all would have: the means and second moments
    weighted by each process's number of batches (in float64, one
    all-reduce)."""
    parts = []
    for layer in layers:
        count = layer.num_batches_tracked.to(torch.float64).reshape(1)
        mean = layer.running_mean.to(torch.float64)
        second = layer.running_var.to(torch.float64) + mean.square()
        parts += [count, count * mean, count * second]
    sums = torch.cat(parts)
    all_reduce(sums)
    sizes = [n for layer in layers for n in (1, ) + (layer.num_features, ) * 2]
    pooled = sums.split(sizes)
    for i, layer in enumerate(layers):
        count, mean_sum, second_sum = pooled[3 * i:3 * i + 3]
        if count.item() == 0:  # no process pooled a finite batch
            continue
        mean = mean_sum / count
        layer.running_mean.copy_(mean)
        layer.running_var.copy_((second_sum / count - mean.square())
                                .clamp_min_(0))
        layer.num_batches_tracked.fill_(int(count.item()))


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

    With several processes, each runs ``num_iters`` batches of its own
    share of the data; the statistics are then pooled over all processes,
    so that every process (and the checkpoint) holds those of all their
    batches. SyncSN layers pool over their process group in each forward
    already and are left as they are.

    Returns:
        int: The number of batches this process used.
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
    world_size = get_dist_info()[1]
    if world_size > 1:
        # while in training mode, where SyncSN pools
        local = [m for m in layers
                 if not (isinstance(m, SyncSwitchableNorm) and m._pools())]
        if local:
            _pool_over_processes(local)
    for module, state in zip(others, saved):
        module.load_state_dict(state, strict=False)
    model.train(was_training)
    print_log(
        f'Batch-average statistics of {len(layers)} SN layers filled from '
        f'{used} batches' +
        (f' in each of {world_size} processes' if world_size > 1 else ''),
        logger=logger)
    return used


def _batch_size(loader) -> int:
    """Samples per batch, also of a loader built with a batch sampler
    (mmdet's ``AspectRatioBatchSampler``: ``loader.batch_size`` is None)."""
    size = loader.batch_size or getattr(loader.batch_sampler, 'batch_size',
                                        None)
    if not size:
        raise ValueError(
            f'SNBatchAverageHook: cannot tell how many samples a batch of '
            f'the train loader holds (batch_size is None and its batch '
            f'sampler {type(loader.batch_sampler).__name__} has no '
            f'batch_size), so not how many batches make num_samples.')
    return size


@HOOKS.register_module()
class SNBatchAverageHook(Hook):
    """Fill batch-average SN statistics with the weights frozen.

    SN layers built with ``moving_average=False`` pool their BN statistics
    over every training batch since the last reset. This hook resets them and
    pools them over ``num_samples`` training samples after every
    ``interval`` epochs (or iterations for an iteration-based loop) and
    after the last one whatever the interval, so that validation, test and
    the saved checkpoint use statistics of the final weights. A validation
    after an epoch that is neither sees the last fill's statistics: make
    ``interval`` divide the validation interval. With several processes the
    samples are shared out among them and the statistics pooled over all
    (see :func:`fill_batch_average`). For moving-average SN, mmpretrain's
    ``PreciseBNHook`` works as with BN.

    Args:
        num_samples (int): Samples (over all processes) to pool, in whole
            batches (at least one, at most the loader's). Defaults to 8192.
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
        num_iters = max(1,
                        self.num_samples // (_batch_size(loader) * world_size))
        fill_batch_average(runner.model, loader, min(num_iters, len(loader)),
                           runner.logger)

    def after_train_epoch(self, runner) -> None:
        if isinstance(runner.train_loop, EpochBasedTrainLoop) and (
                self.every_n_epochs(runner, self.interval)
                or self.is_last_train_epoch(runner)):
            self._fill(runner)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        if isinstance(runner.train_loop, IterBasedTrainLoop) and (
                self.every_n_train_iters(runner, self.interval)
                or self.is_last_train_iter(runner)):
            self._fill(runner)
