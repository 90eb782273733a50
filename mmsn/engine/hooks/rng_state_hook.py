"""Random number generators in checkpoints, so that resuming is exact.

mmengine's checkpoints hold the model, optimizer, schedulers and the seed,
but not the generators' states, so a resumed run draws other augmentations
(and dropout masks) than an uninterrupted one and ends with other weights.
"""
import functools
import logging
import random
from typing import List, Optional

import numpy as np
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop, IterBasedTrainLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator

CHECKPOINT_KEY = 'rng_states'


def capture_rng_states() -> dict:
    """This process's generators: Python's ``random``, numpy's global one,
    torch's CPU one and every CUDA device's (once CUDA is initialized), as
    tensors and plain numbers, which ``torch.load(weights_only=True)``
    reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(
        python=dict(version=version,
                    internal=torch.tensor(internal, dtype=torch.int64),
                    gauss_next=gauss_next),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)),
                   pos=int(pos), has_gauss=int(has_gauss),
                   gauss=float(gauss)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict) -> None:
    """Set the generators to what :func:`capture_rng_states` returned."""
    python = state['python']
    random.setstate((python['version'],
                     tuple(python['internal'].tolist()),
                     python['gauss_next']))
    numpy = state['numpy']
    np.random.set_state(
        (numpy['kind'], numpy['keys'].numpy().astype(np.uint32),
         numpy['pos'], numpy['has_gauss'], numpy['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _sampler(loader):
    """The loader's sampler if it has a seed (mmengine's DefaultSampler,
    InfiniteSampler), also behind a batch sampler."""
    for sampler in (getattr(loader, 'sampler', None),
                    getattr(getattr(loader, 'batch_sampler', None),
                            'sampler', None)):
        if hasattr(sampler, 'seed'):
            return sampler
    return None


def _worker_seed(loader) -> Optional[int]:
    init_fn = getattr(loader, 'worker_init_fn', None)
    if isinstance(init_fn, functools.partial):
        return init_fn.keywords.get('seed')
    return None


def _loader_settings(loader) -> Optional[dict]:
    """What decides which process draws the augmentations, and from which
    generators: this process (no workers) or workers seeded per worker id,
    once (persistent) or every epoch."""
    if loader is None:
        return None
    workers = getattr(loader, 'num_workers', 0)
    return dict(num_workers=workers,
                persistent_workers=bool(
                    workers and getattr(loader, 'persistent_workers', False)))


def _process_state(generators: dict, loader) -> dict:
    """One process's part of the checkpoint: its generators and the seeds
    its train loader was built with (the worker seed differs between
    processes with ``randomness.diff_rank_seed``)."""
    sampler = _sampler(loader)
    return dict(generators=generators,
                sampler_seed=None if sampler is None else sampler.seed,
                worker_seed=_worker_seed(loader))


def _loader_changes(saved: Optional[dict], now: dict) -> List[str]:
    """The train loader settings that differ from the checkpoint's, each as
    ``train_dataloader.<name> is <now> here, <saved> when the checkpoint
    was saved``."""
    if saved is None:  # saved outside training: nothing to compare
        return []
    return [
        f'train_dataloader.{name} is {now[name]} here, {saved[name]} when '
        f'the checkpoint was saved' for name in ('num_workers',
                                                 'persistent_workers')
        if saved[name] != now[name]
    ]


def _warn(message: str) -> None:
    print_log(f'RNGStateHook: {message}', logger='current',
              level=logging.WARNING)


def _warn_not_exact(reasons: List[str]) -> None:
    _warn('the resumed run will not repeat the uninterrupted one exactly: '
          + '; '.join(reasons) + '.')


class _RestoreAfter:
    """An iterator that sets the generators before its ``count``-th item:
    an iteration-based loop re-reads the batches it has trained on before
    going on, and that must not move the restored generators."""

    def __init__(self, iterator, count: int, state: dict):
        self._iterator = iterator
        self._remaining = count
        self._state = state

    def __iter__(self):
        return self

    def __next__(self):
        if self._remaining == 0 and self._state is not None:
            restore_rng_states(self._state)
            self._state = None
        self._remaining -= 1
        return next(self._iterator)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the random number generators in checkpoints and restore them on
    resume, so that an interrupted and resumed training ends with the same
    weights as an uninterrupted one (given the same machine and software).

    One line in a config: ``custom_hooks = [dict(type='RNGStateHook')]``.

    * Saved (``checkpoint['rng_states']``): every process's Python, numpy,
      torch CPU and CUDA generators as they are when the checkpoint is
      written, the sampler and worker seeds its train loader was built with,
      and the loader's ``num_workers`` and ``persistent_workers``.
    * Restored on resume, after the Runner's own seeding, the model's
      initialization and the checkpoint's loading: at the start of training
      (epoch-based loops; the sampler's order follows from its seed and the
      restored epoch) or once an iteration-based loop has skipped the
      batches it trained on. The sampler and worker seeds are those saved,
      also when this run was started with another (or a random) seed.
      Loading weights with ``load_from`` restores nothing.
    * Validation runs between the training's draws and gives them back, so
      that a run that validates after a checkpoint and one that resumes from
      it draw the same.
    * Dataloader workers: mmengine seeds each worker from (seed, rank,
      worker id) when it starts, which non-persistent workers do every
      epoch; the seed is kept in the checkpoint. Persistent workers keep
      their generators in their own processes, which a checkpoint cannot
      hold: the hook warns that such a run does not resume exactly.
    * A resume that cannot repeat the uninterrupted run warns and names
      why: another number of processes (the generators are then not
      restored), another ``num_workers`` or ``persistent_workers``, or a
      checkpoint without generator states.
    """
    # after the hooks that may draw when an epoch ends (e.g. filling
    # batch-average statistics), before CheckpointHook (VERY_LOW)
    priority = 'LOW'

    def __init__(self) -> None:
        self._gathered = None  # (position, every process's states)
        self._outside_val = None  # the training's states while validating
        self._loaded = None  # (position, states) of a loaded checkpoint

    # -- saving --------------------------------------------------------------
    def _own_state(self, loader) -> dict:
        return _process_state(self._outside_val or capture_rng_states(),
                              loader)

    def _gather_if_saving(self, runner, by_epoch: bool,
                          position: tuple) -> None:
        """With several processes, collect everyone's states where a
        checkpoint is about to be written (only the main process writes)."""
        if get_dist_info()[1] == 1:
            return
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook) and hook.by_epoch == by_epoch:
                due = hook.every_n_epochs(
                    runner, hook.interval, hook.save_begin) if by_epoch \
                    else hook.every_n_train_iters(runner, hook.interval,
                                                  hook.save_begin)
                last = hook.is_last_train_epoch(runner) if by_epoch \
                    else hook.is_last_train_iter(runner)
                if due or (hook.save_last and last):
                    own = self._own_state(runner.train_loop.dataloader)
                    self._gathered = (position, all_gather_object(own))
                    return

    def after_train_epoch(self, runner) -> None:
        self._gather_if_saving(runner, True, (runner.epoch + 1, runner.iter))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        self._gather_if_saving(runner, False, (runner.epoch, runner.iter + 1))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta', {})
        position = (meta.get('epoch'), meta.get('iter'))
        # the loop, not runner.train_loop: that would build one when a
        # checkpoint is saved outside training
        loop = getattr(runner, '_train_loop', None)
        loader = loop.dataloader if isinstance(loop, BaseLoop) else None
        world_size = get_dist_info()[1]
        if world_size == 1:
            ranks = [self._own_state(loader)]
        elif self._gathered is not None and self._gathered[0] == position:
            ranks = self._gathered[1]
        else:
            ranks = None  # written outside the hook's view: cannot restore
        checkpoint[CHECKPOINT_KEY] = dict(world_size=world_size,
                                          loader=_loader_settings(loader),
                                          ranks=ranks)

    # -- validation draws nothing from the training's streams ---------------
    def before_val(self, runner) -> None:
        self._outside_val = capture_rng_states()

    def after_val(self, runner) -> None:
        if self._outside_val is not None:
            restore_rng_states(self._outside_val)
            self._outside_val = None

    # -- resuming ------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta', {})
        self._loaded = ((meta.get('epoch'), meta.get('iter')),
                        checkpoint.get(CHECKPOINT_KEY))

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        loader = loop.dataloader
        settings = _loader_settings(loader)
        if settings['persistent_workers']:
            _warn('the train loader has persistent workers, whose random '
                  'generators live in the worker processes and are not '
                  'saved; a resumed run will not repeat the uninterrupted '
                  'one exactly (persistent_workers=False would).')
        loaded, self._loaded = self._loaded, None
        resumed = (loop.epoch, loop.iter) != (0, 0)
        if not resumed:
            return
        # without 'loader': written by an earlier mmsn, in another layout
        if loaded is None or loaded[0] != (loop.epoch, loop.iter) or \
                not isinstance(loaded[1], dict) or 'loader' not in loaded[1]:
            _warn('the checkpoint resumed from holds no random generator '
                  'states (it was saved without this hook, or by an earlier '
                  'mmsn); the resumed run will not repeat an uninterrupted '
                  'one exactly.')
            return
        saved = loaded[1]
        rank, world_size = get_dist_info()
        changes = _loader_changes(saved['loader'], settings)
        if saved['world_size'] != world_size or saved['ranks'] is None:
            what = (f'{saved["world_size"]} processes saved the checkpoint, '
                    f'{world_size} resume it'
                    if saved['world_size'] != world_size else
                    'the checkpoint was written outside training and holds '
                    'no generator states')
            _warn_not_exact([f'{what}; the generators are not restored'] +
                            changes)
            return
        own = saved['ranks'][rank]
        reseeded = self._restore_loader_seeds(loader, own)
        if isinstance(loop, IterBasedTrainLoop):
            iterator = loop.dataloader_iterator
            if reseeded:  # its sampler and workers started with old seeds
                sampler = _sampler(loader)
                if isinstance(sampler, InfiniteSampler):
                    # one index stream for every iterator of the loader,
                    # already drawn from (by the workers' prefetching) and
                    # closed with the old iterator: start it anew
                    sampler.indices = sampler._indices_of_rank()
                iterator = _InfiniteDataloaderIterator(loader)
            loop.dataloader_iterator = _RestoreAfter(iterator, loop.iter,
                                                     own['generators'])
        else:
            restore_rng_states(own['generators'])
        if changes:
            _warn_not_exact(changes)
        print_log(
            f'RNGStateHook: random generators restored as saved at epoch '
            f'{loop.epoch}, iteration {loop.iter}', logger='current')

    @staticmethod
    def _restore_loader_seeds(loader, saved: dict) -> bool:
        """The seeds the loader was built with (a run without a fixed seed
        draws new ones); returns whether any changed."""
        changed = False
        sampler = _sampler(loader)
        if sampler is not None and saved['sampler_seed'] is not None \
                and sampler.seed != saved['sampler_seed']:
            sampler.seed = saved['sampler_seed']
            changed = True
        init_fn = getattr(loader, 'worker_init_fn', None)
        if saved['worker_seed'] is not None and \
                _worker_seed(loader) not in (None, saved['worker_seed']):
            loader.worker_init_fn = functools.partial(
                init_fn.func, *init_fn.args,
                **dict(init_fn.keywords, seed=saved['worker_seed']))
            changed = True
        return changed
