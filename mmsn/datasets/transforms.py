"""Transforms for the one-channel images of the digits demo."""
import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmpretrain.registry import TRANSFORMS


@TRANSFORMS.register_module()
class ToGrayscale(BaseTransform):
    """Make ``results['img']`` a one-channel (H, W) image.

    A colour image, as mmcv and mmpretrain's inferencers load image files
    (BGR, 3 channels), becomes grey with :func:`mmcv.bgr2gray` (ITU-R 601
    weights, as OpenCV); a grey (H, W) or (H, W, 1) image passes unchanged.
    So a model trained on one-channel images (e.g. ``SklearnDigits``) also
    takes image files.

    Required keys: ``img``. Modified keys: ``img``.
    """

    def transform(self, results: dict) -> dict:
        img = results['img']
        if img.ndim == 3 and img.shape[2] == 3:
            img = mmcv.bgr2gray(img)
        elif img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        elif img.ndim != 2:
            raise ValueError(
                f'ToGrayscale expects an (H, W), (H, W, 1) or BGR (H, W, 3) '
                f'image, got shape {img.shape}')
        results['img'] = np.ascontiguousarray(img)
        return results
