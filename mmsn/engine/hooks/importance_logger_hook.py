"""Log the learned SN importance shares during training."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mmsn.analysis.importance import (BN_SHARE_THRESHOLD, average_shares,
                                      collect_importance, flagged_layers,
                                      format_table, importance_scalars)


@HOOKS.register_module()
class SNImportanceLoggerHook(Hook):
    """Write the IN/LN/BN shares of every SN layer to the visualizer.

    Every ``interval`` training iterations the softmax shares of the means
    and variances of each SN layer (and their average over layers) go to
    ``runner.visualizer.add_scalars`` at the iteration the loss is logged
    at, so they appear in every configured backend (``scalars.json`` of
    ``LocalVisBackend``, TensorBoard, ...) next to the loss. Tags are
    ``{prefix}/{layer}/{mean|var}_{in|ln|bn}`` and
    ``{prefix}/avg/{mean|var}_{in|ln|bn}``. A one-line average goes to the
    text log, and after training a per-layer table with the layers where the
    authors advise batch average (BN share above ``threshold`` in a
    moving-average layer).

    Args:
        interval (int): Iterations between two logs. Defaults to 50.
        prefix (str): Tag prefix. Defaults to ``'sn_importance'``.
        per_layer (bool): Log every layer, not only the average.
            Defaults to True.
        threshold (float): BN share above which a moving-average layer is
            flagged in the final table. Defaults to 0.3.
    """
    priority = 'NORMAL'

    def __init__(self,
                 interval: int = 50,
                 prefix: str = 'sn_importance',
                 per_layer: bool = True,
                 threshold: float = BN_SHARE_THRESHOLD) -> None:
        if interval <= 0:
            raise ValueError(f'interval must be positive, got {interval}')
        self.interval = interval
        self.prefix = prefix
        self.per_layer = per_layer
        self.threshold = threshold

    def _log(self, runner, step: int) -> None:
        records = collect_importance(runner.model)
        if not records:
            return
        scalars = importance_scalars(records, self.prefix)
        if not self.per_layer:
            scalars = {
                k: v
                for k, v in scalars.items()
                if k.startswith(f'{self.prefix}/avg/')
            }
        runner.visualizer.add_scalars(scalars, step=step)
        avg = average_shares(records)
        text = '  '.join(
            f'{kind} ' + '/'.join(f'{s:.3f}' for s in shares)
            for kind, shares in avg.items())
        runner.logger.info(
            f'SN importance, average over {len(records)} layers, '
            f'IN/LN/BN: {text}')

    def before_train(self, runner) -> None:
        # The initial shares (1/3 each, or whatever was loaded) as step 0.
        self._log(runner, runner.iter)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            # runner.iter is still the index of this iteration; LoggerHook
            # logs the loss at runner.iter + 1.
            self._log(runner, runner.iter + 1)

    def after_train(self, runner) -> None:
        records = collect_importance(runner.model)
        if not records:
            return
        runner.logger.info('SN importance after training:\n' +
                           format_table(records, self.threshold))
        flagged = flagged_layers(records, self.threshold)
        if flagged:
            runner.logger.warning(
                f'{len(flagged)} SN layers use moving averages with a BN '
                f'share above {self.threshold}; the SN authors advise batch '
                f'average there (norm_cfg moving_average=False with '
                f'SNBatchAverageHook): ' +
                ', '.join(r.name for r in flagged))
