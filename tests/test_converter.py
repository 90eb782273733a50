"""The converter of the SN authors' checkpoints, checked end to end.

The reference models of ``_authors_resnet.py`` are written from the published
layout and equations (the authors' module names, including v2's bare
shortcut conv; SN with the unbiased IN variance and LN/BN statistics derived
from the IN ones); they do not use mmsn. Their random weights are saved in
the authors' checkpoint format, converted with
``tools/model_converters/sn_to_mmpretrain.py`` and loaded into the model of
the matching config; both must give the same logits in eval mode. Every bad
input is in one table with the exact message it must give.
"""
import importlib.util
import os.path as osp
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import mmsn  # noqa: F401
from _authors_resnet import RefResNet, randomize, save_authors_checkpoint
from mmsn.converters import suggested_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'model_converters', 'sn_to_mmpretrain.py')
TOL = 1e-5


def load_tool():
    spec = importlib.util.spec_from_file_location('sn_to_mmpretrain', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_from_config(config):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model).eval()


CASES = [
    # (model name, using_bn): the zoo's rows, v2 with its bare shortcut conv
    ('resnetv1sn50', True),
    ('resnetv1sn101', True),
    ('resnetv2sn50', True),
    ('resnetv2sn101', True),
    ('resnetv1sn50', False),
]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def _architecture(name):
    version, depth = re.fullmatch(r'resnetv(\d)sn(\d+)', name).groups()
    return int(version), int(depth)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """``converted(name, using_bn)`` -> (reference model, source, converted
    file), each case written and converted once per module."""
    tool = load_tool()
    cache = {}

    def get(name, using_bn):
        if (name, using_bn) not in cache:
            folder = tmp_path_factory.mktemp(f'{name}_{using_bn}')
            version, depth = _architecture(name)
            ref = randomize(
                RefResNet(version, depth, using_bn),
                seed=CASES.index((name, using_bn)))
            src = str(folder / f'{name}.pth.tar')
            dst = str(folder / f'{name}_mmpretrain.pth')
            save_authors_checkpoint(ref, src, name)
            # what a conversion killed while writing leaves: removed
            stale = f'{dst}.{_dead_pid()}.partial'
            with open(stale, 'wb') as f:
                f.write(b'PK\x03\x04 the first bytes')
            assert tool.main([src, dst]) == 0
            assert sorted(p.name for p in folder.iterdir()) == sorted(
                [osp.basename(src), osp.basename(dst)])
            cache[(name, using_bn)] = (ref, src, dst)
        return cache[(name, using_bn)]

    return get


def test_reference_v2_shortcut_is_a_bare_conv():
    """The v2 reference has the authors' layout: ``downsample`` is the conv
    itself (key ``layerK.0.downsample.weight``); v1's is a Sequential."""
    v2 = RefResNet(2, 50).state_dict()
    assert [k for k in v2 if 'downsample' in k] == [
        f'layer{i}.0.downsample.weight' for i in range(1, 5)
    ]
    v1 = RefResNet(1, 50).state_dict()
    assert 'layer1.0.downsample.0.weight' in v1
    assert 'layer1.0.downsample.1.mean_weight' in v1


@pytest.mark.parametrize('name,using_bn', CASES)
def test_logits_match_reference(converted, name, using_bn, capsys):
    ref, _, dst = converted(name, using_bn)
    config = osp.join(REPO, suggested_config(name, using_bn))
    model = build_from_config(config)
    checkpoint = torch.load(dst, map_location='cpu', weights_only=True)
    incompatible = model.load_state_dict(checkpoint['state_dict'], strict=True)
    assert not incompatible.missing_keys
    assert not incompatible.unexpected_keys

    meta = checkpoint['meta']
    assert meta['converted_from']['model'] == name
    assert meta['converted_from']['using_bn'] == using_bn
    assert meta['converted_from']['epoch'] == 100
    assert meta['converted_from']['best_prec1'] == pytest.approx(77.49)
    assert meta['config'] == suggested_config(name, using_bn)
    assert len(meta['dataset_meta']['classes']) == 1000

    version, depth = _architecture(name)
    assert type(model.backbone).__name__ == (
        'ResNet' if version == 1 else 'PreActResNet')
    assert model.backbone.depth == depth
    sn = model.backbone.layer1[0].sn1
    assert tuple(sn.mean_weight.shape) == ((3, ) if using_bn else (2, ))
    assert sn.using_bn == using_bn
    if version == 2:
        # the authors' bare shortcut conv landed in downsample.0
        assert torch.equal(model.backbone.layer3[0].downsample[0].weight,
                           ref.layer3[0].downsample.weight)

    # The authors' evaluation size. Smaller inputs leave IN statistics of
    # 2x2 maps in the last stage, where fp32 rounding of *both* models grows
    # past 1e-5 in a random 50-layer net (each is ~2e-5 from a float64 run
    # at 64x64 without the BN branch).
    x = torch.randn((1, 3, 224, 224),
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(x)
        got = model(x, mode='tensor')
        # In float64 the two agree to rounding: the mapping is exact.
        diff64 = (model.double()(x.double(), mode='tensor') -
                  ref.double()(x.double())).abs().max().item()
    ref.float()
    diff = (got - expected).abs().max().item()
    with capsys.disabled():
        print(f'\n[converter] {name} using_bn={using_bn}: max |logit diff| '
              f'fp32 {diff:.3g}, fp64 {diff64:.3g} (logit scale '
              f'{expected.abs().max():.3g})')
    assert got.shape == (1, 1000)
    assert diff <= TOL
    assert diff64 <= 1e-12
    # Not trivially equal: the logits are spread, not constant.
    assert expected.std() > 0.1


def test_inferencer_runs_on_converted(converted):
    from mmpretrain.apis import ImageClassificationInferencer
    from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
    _, _, dst = converted('resnetv1sn50', True)
    config = osp.join(REPO, suggested_config('resnetv1sn50', True))
    inferencer = ImageClassificationInferencer(
        model=config, pretrained=dst, device='cpu')
    image = np.random.default_rng(0).integers(
        0, 256, (96, 128, 3), dtype=np.uint8)
    result = inferencer(image)[0]
    assert result['pred_scores'].shape == (1000, )
    assert result['pred_label'] == int(np.argmax(result['pred_scores']))
    assert result['pred_class'] == IMAGENET_CATEGORIES[result['pred_label']]


def test_test_tool_runs_on_converted(converted, tmp_path):
    """tools/test.py evaluates the converted checkpoint with the zoo config
    (its ImageNet pipeline, pointed at two generated images)."""
    from PIL import Image
    root = tmp_path / 'imagenet'
    (root / 'val').mkdir(parents=True)
    (root / 'meta').mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)) \
            .save(root / 'val' / f'img_{i}.JPEG')
    (root / 'meta' / 'val.txt').write_text('img_0.JPEG 3\nimg_1.JPEG 7\n')
    _, _, dst = converted('resnetv1sn50', True)
    config = osp.join(REPO, suggested_config('resnetv1sn50', True))
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO, 'tools', 'test.py'), config, dst, '--work-dir',
        str(tmp_path / 'work'), '--out',
        str(tmp_path / 'preds.pkl'), '--cfg-options',
        f'test_dataloader.dataset.data_root={root}',
        'test_dataloader.batch_size=2', 'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False'
    ],
                          capture_output=True,
                          text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'accuracy/top1' in proc.stdout + proc.stderr
    import pickle
    with open(tmp_path / 'preds.pkl', 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 2
    assert preds[0]['pred_score'].shape == (1000, )


# -- bad input: one table, the exact message of each --------------------------
KNOWN = ('resnetv1sn101, resnetv1sn50, resnetv1ssn50, resnetv2sn101, '
         'resnetv2sn50')


def _set(key, value):

    def edit(ckpt):
        ckpt['state_dict'][key] = value

    return edit


def _delete(*keys):

    def edit(ckpt):
        for key in keys:
            del ckpt['state_dict'][key]

    return edit


def _set_top(key, value):

    def edit(ckpt):
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value

    return edit


def _fc_classes(n):

    def edit(ckpt):
        ckpt['state_dict']['module.fc.weight'] = torch.zeros(n, 2048)
        ckpt['state_dict']['module.fc.bias'] = torch.zeros(n)

    return edit


def _two_logits_in_stem(ckpt):
    ckpt['state_dict']['module.sn1.mean_weight'] = torch.ones(2)
    ckpt['state_dict']['module.sn1.var_weight'] = torch.ones(2)


def _no_importance(ckpt):
    ckpt['state_dict'] = {
        k: v
        for k, v in ckpt['state_dict'].items()
        if not k.endswith(('mean_weight', 'var_weight'))
    }


def _v2_shortcut_in_a_sequential(ckpt):
    # the layout of the stand-in model older tests used, not the authors'
    sd = ckpt['state_dict']
    for i in range(1, 5):
        sd[f'module.layer{i}.0.downsample.0.weight'] = sd.pop(
            f'module.layer{i}.0.downsample.weight')


def _replace_file(obj):

    def write(path):
        torch.save(obj, path)

    return write


class _Pickled:
    pass


# (id, source case, edit of the checkpoint dict, exact message)
BAD_CHECKPOINTS = [
    ('unknown key', ('resnetv1sn50', True),
     _set('module.layer1.0.extra.weight', torch.zeros(3)),
     'unknown keys (no place in the target model): '
     'module.layer1.0.extra.weight'),
    ('missing conv', ('resnetv1sn50', True),
     _delete('module.layer2.1.conv2.weight'),
     'keys the target model needs but the source lacks: '
     'module.layer2.1.conv2.weight'),
    # only the missing tensor, not the layer's others as shape mismatches
    ('missing mean_weight', ('resnetv1sn50', True),
     _delete('module.layer1.0.sn1.mean_weight'),
     'keys the target model needs but the source lacks: '
     'module.layer1.0.sn1.mean_weight'),
    ('missing running_var', ('resnetv1sn50', True),
     _delete('module.layer3.2.sn2.running_var'),
     'keys the target model needs but the source lacks: '
     'module.layer3.2.sn2.running_var'),
    ('missing v2 shortcut', ('resnetv2sn50', True),
     _delete('module.layer2.0.downsample.weight'),
     'keys the target model needs but the source lacks: '
     'module.layer2.0.downsample.weight'),
    ('running stats without BN branch', ('resnetv1sn50', False),
     _set('module.sn1.running_mean', torch.zeros(1, 64, 1)),
     'unknown keys (no place in the target model): module.sn1.running_mean'),
    ('SN channels', ('resnetv1sn50', True),
     _set('module.sn1.weight', torch.ones(1, 32, 1, 1)),
     'shape mismatches: module.sn1.weight has shape (1, 32, 1, 1) but '
     'backbone.sn1.weight needs (64,)'),
    ('classes', ('resnetv1sn50', True), _fc_classes(10),
     'shape mismatches: module.fc.weight has shape (10, 2048) but '
     'head.fc.weight needs (1000, 2048); module.fc.bias has shape (10,) but '
     'head.fc.bias needs (1000,)'),
    ('not a tensor', ('resnetv1sn50', True), _set('module.fc.bias', 3),
     'values that are not tensors: module.fc.bias (int)'),
    ('mixed branches', ('resnetv1sn50', True), _two_logits_in_stem,
     'SN importance logits must all have shape (3,) (with BN branch) or all '
     '(2,) (without); found shapes [(2,), (3,)]'),
    ('no SN layer', ('resnetv1sn50', True), _no_importance,
     'No SN layer (key ending in ".mean_weight" or ".var_weight") found: '
     'this is not a checkpoint of the Switchable Normalization zoo'),
    ('unknown model', ('resnetv1sn50', True),
     _set_top('model', 'resnetv1sn18'),
     f"Unknown model 'resnetv1sn18'; this converter knows {KNOWN} (pass "
     '--model to name the architecture of a checkpoint without a "model" '
     'entry)'),
    ('no model entry', ('resnetv1sn50', True), _set_top('model', None),
     f'{{src}} has no "model" entry: pass --model, one of {KNOWN}'),
    ('no state_dict', ('resnetv1sn50', True), _set_top('state_dict', None),
     '{src} has no "state_dict" dict (top-level keys: [\'best_prec1\', '
     '\'epoch\', \'model\', \'optimizer\'])'),
    # as many elements as the target, another layout: refused, not reshaped
    ('SN gamma with C on another axis', ('resnetv1sn50', True),
     _set('module.sn1.weight', torch.ones(64, 1, 1, 1)),
     'shape mismatches: module.sn1.weight has shape (64, 1, 1, 1) but '
     'backbone.sn1.weight needs (64,)'),
    ('running mean in two columns', ('resnetv1sn50', True),
     _set('module.layer1.0.sn1.running_mean', torch.zeros(1, 32, 2)),
     'shape mismatches: module.layer1.0.sn1.running_mean has shape '
     '(1, 32, 2) but backbone.layer1.0.sn1.running_mean needs (64,)'),
    ('fc bias as a column', ('resnetv1sn50', True),
     _set('module.fc.bias', torch.zeros(1000, 1)),
     'shape mismatches: module.fc.bias has shape (1000, 1) but head.fc.bias '
     'needs (1000,)'),
    ('fc weight transposed', ('resnetv1sn50', True),
     _set('module.fc.weight', torch.zeros(2048, 1000)),
     'shape mismatches: module.fc.weight has shape (2048, 1000) but '
     'head.fc.weight needs (1000, 2048)'),
    ('importance logits as a column', ('resnetv1sn50', True),
     _set('module.sn1.mean_weight', torch.ones(3, 1)),
     'SN importance logits must all have shape (3,) (with BN branch) or all '
     '(2,) (without); found shapes [(3,), (3, 1)]'),
    ('v2 shortcut as Sequential', ('resnetv2sn50', True),
     _v2_shortcut_in_a_sequential,
     'unknown keys (no place in the target model): ' + ', '.join(
         f'module.layer{i}.0.downsample.0.weight' for i in range(1, 5)) +
     '\nkeys the target model needs but the source lacks: ' + ', '.join(
         f'module.layer{i}.0.downsample.weight' for i in range(1, 5))),
]

WRONG_ARCHITECTURE = (
    'unknown keys (no place in the target model): '
    'module.layer1.0.downsample.weight, module.layer2.0.downsample.weight, '
    'module.layer3.0.downsample.weight, module.layer4.0.downsample.weight, '
    'module.sn_out.weight, module.sn_out.bias, and 4 more\n'
    'keys the target model needs but the source lacks: '
    'module.layer1.0.downsample.0.weight, '
    'module.layer1.0.downsample.1.weight, '
    'module.layer1.0.downsample.1.bias, '
    'module.layer1.0.downsample.1.mean_weight, '
    'module.layer1.0.downsample.1.var_weight, '
    'module.layer1.0.downsample.1.running_mean, and 22 more\n'
    'shape mismatches: '
    'module.layer1.0.sn3.weight has shape (1, 64, 1, 1) but '
    'backbone.layer1.0.sn3.weight needs (256,); '
    'module.layer1.0.sn3.bias has shape (1, 64, 1, 1) but '
    'backbone.layer1.0.sn3.bias needs (256,); '
    'module.layer1.0.sn3.running_mean has shape (1, 64, 1) but '
    'backbone.layer1.0.sn3.running_mean needs (256,); '
    'module.layer1.0.sn3.running_var has shape (1, 64, 1) but '
    'backbone.layer1.0.sn3.running_var needs (256,); '
    'module.layer1.1.sn1.weight has shape (1, 256, 1, 1) but '
    'backbone.layer1.1.sn1.weight needs (64,); '
    'module.layer1.1.sn1.bias has shape (1, 256, 1, 1) but '
    'backbone.layer1.1.sn1.bias needs (64,); and 118 more\n'
    '(checked against resnetv1sn50 with using_bn=True, as --model says)')


def test_wrong_architecture_is_refused(converted, tmp_path, capsys):
    """A v2 checkpoint converted as v1: the lists are cut after six names
    and the last line says which layout was assumed."""
    _, src, _ = converted('resnetv2sn50', True)
    got = _run_tool(src, tmp_path / 'out.pth', capsys,
                    ['--model', 'resnetv1sn50'])
    assert got == WRONG_ARCHITECTURE


def _random_bytes(path):
    with open(path, 'wb') as f:
        f.write(np.random.default_rng(0).bytes(4096))


def _cut_short(path):
    torch.save({'model': 'resnetv1sn50', 'state_dict': {
        'module.conv1.weight': torch.ones(64, 3, 7, 7)}}, path)
    with open(path, 'r+b') as f:
        f.truncate(10000)


# Neither torch's advice to load with weights_only=False nor to allowlist
# the refused global: for a file of unknown origin both would run its code.
UNREADABLE = ('Cannot read {src} as a PyTorch checkpoint of tensors and plain '
              'values ({reason}); the authors\' checkpoints hold nothing '
              'else')

# (id, what the source file holds, exact message or a pattern)
BAD_FILES = [
    ('not a dict', _replace_file([1, 2]),
     '{src} holds a list, expected a dict with "state_dict" and "model"'),
    ('pickled object', _replace_file({'state_dict': _Pickled()}),
     re.compile(re.escape(UNREADABLE).replace(r'\{src\}', r'\S+').replace(
         r'\{reason\}', r'Unsupported global: GLOBAL \S+\._Pickled was not '
         r'an allowed global by default'))),
    ('random bytes', _random_bytes,
     re.compile(re.escape(UNREADABLE).replace(r'\{src\}', r'\S+').replace(
         r'\{reason\}', r'Unsupported operand \d+'))),
    ('cut short', _cut_short,
     '{src} is damaged: it begins as a zip archive (the format of torch.save) '
     'but has no readable zip directory at its end, as when a download or '
     'copy is cut short; get the file again'),
    ('not a file', None, "[Errno 2] No such file or directory: '{src}'"),
]


def _run_tool(src, dst, capsys, extra_args=()):
    code = load_tool().main([src, str(dst), *extra_args])
    err = capsys.readouterr().err
    assert code == 1
    assert not dst.exists(), 'nothing may be written on error'
    assert not list(dst.parent.glob('*.partial'))
    prefix, suffix = 'error: ', f'\nNothing was written to {dst}.\n'
    assert err.startswith(prefix) and err.endswith(suffix), err
    return err[len(prefix):-len(suffix)]


@pytest.mark.parametrize(
    'case,edit,message', [c[1:] for c in BAD_CHECKPOINTS],
    ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_with_its_message(converted, tmp_path,
                                                    capsys, case, edit,
                                                    message):
    _, src, _ = converted(*case)
    checkpoint = torch.load(src, map_location='cpu', weights_only=True)
    edit(checkpoint)
    bad = str(tmp_path / 'bad.pth.tar')
    torch.save(checkpoint, bad)
    if message.startswith(('unknown keys', 'keys the', 'shape', 'values')):
        message += (f'\n(checked against {case[0]} with using_bn={case[1]}, '
                    'as its model entry says)')
    assert _run_tool(bad, tmp_path / 'out.pth', capsys) == message.format(
        src=bad)


@pytest.mark.parametrize(
    'write,message', [c[1:] for c in BAD_FILES],
    ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_refused_with_its_message(tmp_path, capsys, write,
                                              message):
    src = str(tmp_path / 'bad.pth.tar')
    if write is not None:
        write(src)
    got = _run_tool(src, tmp_path / 'out.pth', capsys)
    if isinstance(message, str):
        assert got == message.format(src=src)
    else:
        assert message.fullmatch(got), got
    assert 'weights_only' not in got and 'allowlist' not in got


def test_damaged_archive_is_refused_naming_the_record(converted, tmp_path,
                                                      capsys):
    """4 KiB of one tensor's bytes changed in an authors' checkpoint (a bad
    download): torch.load reads it without a word, the zip record's CRC-32
    gives it away."""
    _, src, _ = converted('resnetv1sn50', True)
    tensor = torch.load(src, map_location='cpu', weights_only=True)[
        'state_dict']['module.layer1.0.conv2.weight']
    raw = tensor.numpy().tobytes()
    with zipfile.ZipFile(src) as archive:
        record, = [info.filename for info in archive.infolist()
                   if archive.read(info) == raw]
    data = bytearray(open(src, 'rb').read())
    start = bytes(data).index(raw) + 1000
    data[start:start + 4096] = bytes(b ^ 0x5A for b in data[start:start + 4096])
    bad = tmp_path / 'damaged.pth.tar'
    bad.write_bytes(bytes(data))
    # torch.load itself does not notice
    torch.load(bad, map_location='cpu', weights_only=True)
    assert _run_tool(str(bad), tmp_path / 'out.pth', capsys) == (
        f'{bad} is damaged: its record {record!r} does not match what was '
        f'saved (Bad CRC-32 for file {record!r}). A download or copy that '
        f'went wrong, or a failing disk, changes bytes; get the file again')


def test_failed_conversion_leaves_an_existing_destination(
        converted, tmp_path, capsys):
    _, src, _ = converted('resnetv1sn50', True)
    checkpoint = torch.load(src, map_location='cpu', weights_only=True)
    del checkpoint['state_dict']['module.fc.bias']
    bad = str(tmp_path / 'bad.pth.tar')
    torch.save(checkpoint, bad)
    dst = tmp_path / 'out.pth'
    dst.write_bytes(b'previous')
    assert load_tool().main([bad, str(dst)]) == 1
    assert dst.read_bytes() == b'previous'
    assert not list(tmp_path.glob('*.partial'))


def test_cli_reports_error(tmp_path):
    dst = tmp_path / 'out.pth'
    src = tmp_path / 'not_a_checkpoint.pth.tar'
    torch.save({'weights': torch.zeros(1)}, str(src))
    proc = subprocess.run([sys.executable, TOOL, str(src), str(dst)],
                          capture_output=True,
                          text=True,
                          cwd=REPO)
    assert proc.returncode == 1
    assert 'no "state_dict"' in proc.stderr
    assert not dst.exists()


def test_config_given_by_file_name(converted, tmp_path, capsys,
                                   monkeypatch):
    """--config takes one of mmsn's configs by its file name, as mim does,
    from any folder; the keys are checked against that config's model (the
    v2 config refuses a v1 checkpoint, which the name alone cannot)."""
    _, src, _ = converted('resnetv1sn50', True)
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / 'by_name.pth'
    assert load_tool().main([src, str(dst), '--config',
                             'resnet50_sn_8xb32']) == 0
    printed = capsys.readouterr().out.splitlines()
    prefix = 'Load it with the config '
    assert printed[-1].startswith(prefix)
    # the package's configs folder may be a link to the checkout's
    assert osp.realpath(printed[-1][len(prefix):]) == osp.realpath(
        osp.join(REPO, 'configs', 'resnet50_sn_8xb32.py'))
    assert dst.exists()

    got = _run_tool(src, tmp_path / 'v2.pth', capsys,
                    ['--config', 'resnet50v2_sn_8xb32.py'])
    assert 'resnet50v2_sn_8xb32.py' in got and 'shape' in got
    got = _run_tool(src, tmp_path / 'typo.pth', capsys,
                    ['--config', 'resnet50_sn_8xb3.py'])
    assert got.startswith("'resnet50_sn_8xb3.py' is neither a file nor the "
                          "name of a config among mmsn's configs")
    assert 'did you mean resnet50_sn_8xb32.py' in got
