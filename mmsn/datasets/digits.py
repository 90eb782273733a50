"""scikit-learn's handwritten digits as an mmpretrain dataset.

The 1797 8x8 grey images of ``sklearn.datasets.load_digits`` ship inside
scikit-learn, so a model can be trained and evaluated with no download. The
split into train and val is fixed (stratified, seeded) so that results are
comparable between runs and machines.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS


def digits_split(labels: np.ndarray, val_ratio: float,
                 seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified split of sample indices into (train, val), both sorted.

    Each class contributes ``round(val_ratio * count)`` samples to val,
    drawn with ``numpy.random.RandomState(seed)``, which gives the same
    indices on every platform and numpy version.
    """
    rng = np.random.RandomState(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(val_ratio * len(members)))
        val.extend(rng.permutation(members)[:count].tolist())
    val = np.sort(np.asarray(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


@DATASETS.register_module()
class SklearnDigits(BaseDataset):
    """Handwritten digits 0-9 (8x8, 16 grey levels) from scikit-learn.

    Images are served as ``uint8`` arrays of shape (8, 8) (levels 0..16
    scaled to 0..255), so mmpretrain's transforms and ``PackInputs`` treat
    them as one-channel images. ``digit_index`` is the sample's index in
    ``load_digits()``.

    Args:
        split (str): ``'train'`` (1438 samples), ``'val'`` (359) or
            ``'all'``. Defaults to ``'train'``.
        val_ratio (float): Share of each class held out for val.
            Defaults to 0.2.
        seed (int): Seed of the fixed split. Defaults to 0.
        pipeline (Sequence): Transforms applied to each sample.
            Defaults to ``()``.
        test_mode (bool, optional): mmengine's test mode. Defaults to None:
            True for ``'val'`` and ``'all'``, False for ``'train'``.
        indices (int | Sequence[int], optional): Keep only these samples
            (an int: the first ones). Defaults to None (all).
        serialize_data (bool): Store the samples serialized, shared by the
            dataloader workers. Defaults to True.
        lazy_init (bool): Load the samples on first access. Defaults to
            False.
        max_refetch (int): Attempts to fetch another sample when the
            pipeline returns None. Defaults to 1000.

    The last five are :class:`mmpretrain.datasets.BaseDataset`'s.
    """
    METAINFO = {'classes': tuple(str(i) for i in range(10))}

    def __init__(self,
                 split: str = 'train',
                 val_ratio: float = 0.2,
                 seed: int = 0,
                 pipeline: Sequence = (),
                 test_mode: Optional[bool] = None,
                 indices: Optional[Union[int, Sequence[int]]] = None,
                 serialize_data: bool = True,
                 lazy_init: bool = False,
                 max_refetch: int = 1000):
        if split not in ('train', 'val', 'all'):
            raise ValueError(
                f"split must be 'train', 'val' or 'all', got {split!r}")
        if not 0 < val_ratio < 1:
            raise ValueError(f'val_ratio must be in (0, 1), got {val_ratio}')
        self.split = split
        self.val_ratio = val_ratio
        self.seed = seed
        super().__init__(
            ann_file='',
            pipeline=pipeline,
            test_mode=split != 'train' if test_mode is None else test_mode,
            indices=indices,
            serialize_data=serialize_data,
            lazy_init=lazy_init,
            max_refetch=max_refetch)

    def load_data_list(self) -> List[dict]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover
            raise ImportError(
                'SklearnDigits needs scikit-learn (pip install scikit-learn)'
            ) from err
        digits = load_digits()
        labels = digits.target.astype(np.int64)
        # Levels 0..16 -> 0..255 (16 * 255 / 16 = 255 exactly).
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train, val = digits_split(labels, self.val_ratio, self.seed)
        indices = {'train': train, 'val': val,
                   'all': np.arange(len(labels))}[self.split]
        return [
            dict(img=images[i], gt_label=int(labels[i]), digit_index=int(i))
            for i in indices
        ]

    def extra_repr(self) -> List[str]:
        return [f'Split: \t{self.split}', f'Val ratio: \t{self.val_ratio}',
                f'Seed: \t{self.seed}']
