"""Small generated data sets for tests (nothing is downloaded)."""
import os.path as osp

import numpy as np
from PIL import Image


def make_image_folder(root, num_classes=2, per_class=4, size=32, seed=0):
    """An ImageNet-style folder ``root/class_k/img_i.png`` of random images
    whose mean brightness depends on the class."""
    rng = np.random.default_rng(seed)
    import os
    for k in range(num_classes):
        folder = osp.join(root, f'class_{k}')
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            base = 60 + 120 * k / max(1, num_classes - 1)
            img = rng.normal(base, 40, (size, size, 3)).clip(0, 255)
            Image.fromarray(img.astype(np.uint8)).save(
                osp.join(folder, f'img_{i}.png'))
    return root
