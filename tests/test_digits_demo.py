"""The digits dataset and the CPU demo config (a few iterations only)."""
import json
import os
import os.path as osp
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

import mmsn  # noqa: F401
from mmsn.datasets import SklearnDigits, digits_split

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'resnet_sn_digits.py')


def test_split_is_fixed_disjoint_and_stratified():
    train, val = SklearnDigits('train'), SklearnDigits('val')
    train_idx = [d['digit_index'] for d in train.load_data_list()]
    val_idx = [d['digit_index'] for d in val.load_data_list()]
    assert (len(train_idx), len(val_idx)) == (1438, 359)
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(1797))
    # Fixed: a second build gives the same indices, another seed does not.
    assert val_idx == [
        d['digit_index'] for d in SklearnDigits('val').load_data_list()
    ]
    other = SklearnDigits('val', seed=1).load_data_list()
    assert val_idx != [d['digit_index'] for d in other]
    # Every class is ~20% held out.
    labels = np.array([val.get_data_info(i)['gt_label']
                       for i in range(len(val))])
    assert np.bincount(labels, minlength=10).min() >= 35
    # The split function itself is deterministic and sorted.
    y = np.repeat(np.arange(3), 10)
    a, b = digits_split(y, 0.2, 0), digits_split(y, 0.2, 0)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert list(a[1]) == sorted(a[1]) and len(a[1]) == 6


def test_samples_are_the_sklearn_images():
    from sklearn.datasets import load_digits
    digits = load_digits()
    dataset = SklearnDigits('val')
    info = dataset.get_data_info(5)
    i = info['digit_index']
    assert info['img'].shape == (8, 8) and info['img'].dtype == np.uint8
    np.testing.assert_array_equal(
        info['img'], np.round(digits.images[i] * 255 / 16).astype(np.uint8))
    assert info['gt_label'] == digits.target[i]
    assert dataset.metainfo['classes'] == tuple('0123456789')
    with pytest.raises(ValueError, match='split'):
        SklearnDigits('test')


def test_pipeline_packs_one_channel_images():
    cfg = Config.fromfile(DEMO_CONFIG)
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import DATASETS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        sample = dataset[0]
    assert tuple(sample['inputs'].shape) == (1, 8, 8)
    assert sample['data_samples'].gt_label.item() in range(10)


# The demo's accuracy moves with the order of float sums: on 2026-12-04 one
# machine gave 97.77 with one thread (as the tests run), 99.16 with two and
# 98.61 compiled, and another 98.33 with one thread (8 to 3 of 359 images
# wrong). The threshold leaves two images below the lowest of these; a
# wrong SN, or a demo that no longer learns, falls well below.
KNOWN_TOP1 = 97.0


def logged_scalars(work_dir) -> list:
    """The records of the run's scalars.json, one dict per line."""
    scalars = next(Path(work_dir).glob('*/vis_data/scalars.json'))
    return [json.loads(x) for x in scalars.read_text().splitlines()]


@pytest.fixture(scope='module')
def trained_demo(tmp_path_factory):
    """The demo config trained as ``tools/run_demo.sh`` does (8 epochs)."""
    from mmengine.runner import Runner
    work_dir = tmp_path_factory.mktemp('demo')
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.work_dir = str(work_dir)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    return work_dir, runner, metrics


def test_demo_reaches_its_accuracy(trained_demo):
    work_dir, runner, metrics = trained_demo
    assert metrics['accuracy/top1'] >= KNOWN_TOP1
    assert (work_dir / 'epoch_8.pth').exists()
    lines = logged_scalars(work_dir)
    assert any('loss' in x for x in lines)
    assert any('sn_importance/backbone.sn1/mean_bn' in x for x in lines)
    # batch average, filled after the last epoch from the whole train split
    # (1438 // 32 = 44 batches) with the final weights
    from mmsn.models.norms.switchable_norm import _SwitchableNorm
    sns = [m for m in runner.model.modules()
           if isinstance(m, _SwitchableNorm)]
    assert sns and all(not m.moving_average for m in sns)
    assert {int(m.num_batches_tracked) for m in sns} == {44}
    log = next(work_dir.glob('*/*.log')).read_text()
    assert 'advise batch average' not in log


def logged_losses(work_dir) -> dict:
    """The training loss of each logging step."""
    return {x['step']: x['loss'] for x in logged_scalars(work_dir)
            if 'loss' in x}


# Steps over which the trajectories of differently ordered float sums (two
# threads, or inductor's convolutions) still agree (2e-8 apart on
# 2026-12-04): the losses of these steps tell a compiled step that computes
# another function (a wrong output, gradient or update) from rounding. Later
# the training's chaos amplifies rounding (3e-5 at step 60, 5e-4 at step 75)
# to a few images at the end.
AGREEING_STEPS = (15, 30, 45)


def test_compiled_demo_reaches_the_same_accuracy(trained_demo,
                                                 tmp_path_factory):
    """``compile=True`` in the config: the model is compiled (SN traced as
    its layer operators), trains along the eager run's trajectory (equal
    losses over the first 45 steps) and reaches the demo's accuracy."""
    from mmengine.runner import Runner
    eager_dir, _, _ = trained_demo
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.work_dir = str(tmp_path_factory.mktemp('demo_compiled'))
    cfg.compile = True
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    assert metrics['accuracy/top1'] >= KNOWN_TOP1
    eager, compiled = logged_losses(eager_dir), logged_losses(cfg.work_dir)
    for step in AGREEING_STEPS:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-6), step
    assert hasattr(runner.model.train_step, '_torchdynamo_orig_callable')


# What the README shows, in a fresh interpreter that does nothing else: no
# ``import mmsn``, no dataset built before (which would register the demo's
# transform on the side).
README_INFERENCE = """
import json, sys
from mmpretrain.apis import ImageClassificationInferencer
inferencer = ImageClassificationInferencer(
    sys.argv[1], pretrained=sys.argv[2], device='cpu')
results = inferencer(sys.argv[4:])
with open(sys.argv[3], 'w') as f:
    json.dump([r['pred_scores'].tolist() for r in results], f)
"""


def test_inferencer_reads_image_files(trained_demo, tmp_path):
    """ImageClassificationInferencer, as the README shows it, on image files
    (grey or colour, 8x8 or a 32x32 digit) gives the scores the model gives
    the dataset's own samples."""
    import subprocess
    import sys

    from mmengine.registry import DefaultScope
    from mmpretrain.registry import DATASETS
    from PIL import Image
    work_dir, _, _ = trained_demo
    cfg = Config.fromfile(DEMO_CONFIG)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        dataset = DATASETS.build(cfg.test_dataloader.dataset)
    count = 12
    images = [dataset.get_data_info(i)['img'] for i in range(count)]
    labels = [dataset.get_data_info(i)['gt_label'] for i in range(count)]
    # 32x32 digits as scikit-learn drew them: each of the 8x8 levels is the
    # count of set pixels in a 4x4 block, here a uniform block.
    variants = {
        'grey': lambda img: Image.fromarray(img),
        'colour': lambda img: Image.fromarray(img).convert('RGB'),
        'grey32': lambda img: Image.fromarray(
            np.kron(img, np.ones((4, 4), np.uint8))),
    }
    files = []
    for name, make in variants.items():
        for i, img in enumerate(images):
            path = tmp_path / f'{name}_{i}.png'
            make(img).save(path)
            files.append(str(path))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-c', README_INFERENCE, DEMO_CONFIG,
         str(work_dir / 'epoch_8.pth'), str(tmp_path / 'scores.json'),
         *files],
        capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = np.array(json.loads((tmp_path / 'scores.json').read_text()))

    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        # as the Runner and the inferencer build it
        model = MODELS.build(
            dict(cfg.model, data_preprocessor=cfg.data_preprocessor)).eval()
    load_checkpoint(model, str(work_dir / 'epoch_8.pth'), map_location='cpu',
                    logger='silent')
    with torch.no_grad():
        batch = [dataset[i] for i in range(count)]
        data = model.data_preprocessor(
            dict(inputs=[b['inputs'] for b in batch],
                 data_samples=[b['data_samples'] for b in batch]), False)
        expected = np.stack([
            sample.pred_score.numpy()
            for sample in model(**data, mode='predict')
        ])
    for k, name in enumerate(variants):
        np.testing.assert_allclose(
            scores[k * count:(k + 1) * count], expected, rtol=1e-5,
            atol=1e-6, err_msg=name)
    correct = (expected.argmax(1) == np.array(labels)).sum()
    assert correct >= count - 1
