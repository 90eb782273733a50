"""Collapsing trained SSN/SN layers into the norms they picked.

CollapsedNorm is checked against SN's equations with one-hot shares
(tests/sn_reference.py) and against the SSN layer it replaces, for every
mean/variance combination; the tool end to end: its written config and
checkpoint load and run in a process that never imports mmsn and give the
SSN model's logits."""
import copy
import errno
import json
import os
import os.path as osp
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn
from mmengine.config import Config
from torch import nn

import mmsn  # noqa: F401
from mmsn import SparseSwitchableNorm2d, SwitchableNorm2d
from mmsn.deploy import (CollapseError, collapse_model, collapsed_config,
                         plan_collapse)
from mmsn.deploy.config import PLAIN_EQUIVALENTS
from mmsn_runtime import BRANCHES, CollapsedNorm, expose_batch_norms
from mmsn.models.norms.switchable_norm import _SwitchableNorm
from sn_reference import reference_sn

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'deploy', 'collapse_norms.py')
SSN_DEMO = osp.join(REPO, 'configs', 'demo', 'resnet_ssn_digits.py')
SN_DEMO = osp.join(REPO, 'configs', 'demo', 'resnet_sn_digits.py')
C = 6
COMBOS = [(m, v) for m in BRANCHES for v in BRANCHES]


def load_tool(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('tool', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_hot(branch, using_bn=True):
    return F.one_hot(torch.tensor(BRANCHES.index(branch)),
                     3 if using_bn else 2).double()


# Not BatchNorm's 1e-5: folding that drops the layer's eps must show.
EPS = 0.05


def _frozen_ssn(mean, var, using_bn=True, seed=0, cls=SparseSwitchableNorm2d,
                unbiased=True, eps=EPS, affine=True):
    """An SSN layer frozen at the given picks, random affine and stats."""
    g = torch.Generator().manual_seed(seed)
    layer = cls(C, using_bn=using_bn, unbiased=unbiased, eps=eps,
                affine=affine).double()
    with torch.no_grad():
        if affine:
            layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=g))
        layer.mean_weight.copy_(_one_hot(mean, using_bn))
        layer.var_weight.copy_(_one_hot(var, using_bn))
        layer.mean_fixed.fill_(1)
        layer.var_fixed.fill_(1)
        if using_bn:
            layer.running_mean.copy_(torch.randn(C, generator=g))
            layer.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return layer.eval()


def _input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((1, shape[1]) + (1, ) * (len(shape) - 2),
                       generator=g) * 3 + 0.2
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + 2


@pytest.mark.parametrize('mean,var', COMBOS)
@pytest.mark.parametrize('unbiased,affine', [(True, True), (False, True),
                                             (True, False)])
def test_collapsed_norm_is_sn_with_one_hot_shares(mean, var, unbiased,
                                                  affine):
    layer = _frozen_ssn(mean, var, unbiased=unbiased, affine=affine)
    module = nn.Sequential(copy.deepcopy(layer))
    (pick, ) = collapse_model(module)
    assert isinstance(module[0], CollapsedNorm)
    assert module[0].picks == (mean, var) == (pick.mean, pick.var)
    assert module[0].eps == EPS
    gamma, beta = ((layer.weight, layer.bias) if affine else
                   (torch.ones(C, dtype=torch.float64),
                    torch.zeros(C, dtype=torch.float64)))
    for shape in ((4, C, 5, 3), (4, C, 1, 1), (3, C, 2, 3, 4), (5, C, 7)):
        x = _input(shape)
        expected, _ = reference_sn(
            x, gamma, beta,
            _one_hot(mean).log(), _one_hot(var).log(),
            (layer.running_mean, layer.running_var), training=False,
            unbiased=unbiased, eps=EPS)
        got = module[0].double()(x)
        torch.testing.assert_close(got, expected)
        if len(shape) == 4:
            torch.testing.assert_close(got, layer(x))


@pytest.mark.parametrize('mean,var', [(m, v) for m in ('IN', 'LN')
                                      for v in ('IN', 'LN')])
def test_layers_without_bn_branch(mean, var):
    layer = _frozen_ssn(mean, var, using_bn=False)
    model = nn.Sequential(copy.deepcopy(layer))
    collapse_model(model)
    x = _input((4, C, 5, 5))
    torch.testing.assert_close(model[0].double()(x), layer(x))


def test_collapsed_norm_state_picks_precision_and_memory_format():
    norm = CollapsedNorm(C, sources=('LN', 'IN'))
    state = norm.state_dict()
    other = CollapsedNorm(C)
    assert other.picks == ('BN', 'BN')
    other.load_state_dict(state)
    assert other.picks == ('LN', 'IN')
    state['sources'] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match='sources must hold two indices'):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match='one of'):
        CollapsedNorm(C, sources=('GN', 'IN'))
    with pytest.raises(ValueError, match=r'expects \(N, 6, \.\.\.\)'):
        norm(torch.randn(2, 4, 3, 3))
    x = torch.randn(2, C, 5, 5) + 1
    expected = norm(x)
    # the differentiable formulation (input needing a gradient) agrees
    torch.testing.assert_close(norm(x.clone().requires_grad_()), expected)
    cl = norm(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, expected)
    # the picks are Python state: tracing records one fixed graph
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation, shapes as constants
        traced = torch.jit.trace(norm, x)
    torch.testing.assert_close(traced(x * 2), norm(x * 2))


def _ulp(exact, dtype):
    """One ulp of ``dtype`` at each value of the float64 ``exact``: the
    spacing of the binade it lies in."""
    _, exponent = torch.frexp(exact)    # exact = m * 2**e, 0.5 <= |m| < 1
    return torch.finfo(dtype).eps * torch.exp2(exponent.double() - 1)


@pytest.mark.parametrize('mean,var', COMBOS)
@pytest.mark.parametrize('low', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('low_module', [False, True],
                         ids=['float32-module', 'low-module'])
def test_low_precision_input_gives_one_rounding_of_the_exact_result(
        mean, var, low, low_module):
    """bf16/fp16 input: statistics and arithmetic in float32, so the output
    is the exact result (float64, from the same rounded input and
    parameters) rounded once: within one ulp of its rounding."""
    norm = CollapsedNorm(C, eps=EPS, sources=(mean, var))
    layer = _frozen_ssn(mean, var)
    with torch.no_grad():
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            getattr(norm, name).copy_(getattr(layer, name))
    norm.to(low if low_module else torch.float32)
    x = _input((4, C, 5, 3)).to(low)
    got = norm(x)
    assert got.dtype == low
    exact, _ = reference_sn(
        x.double(), norm.weight.double(), norm.bias.double(),
        _one_hot(mean).log(), _one_hot(var).log(),
        (norm.running_mean.double(), norm.running_var.double()),
        training=False, eps=EPS)
    error = (got.double() - exact.to(low).double()).abs()
    # the atol covers results near 0, where float32's own rounding of the
    # (x - mean) * scale terms exceeds an ulp of the tiny result
    assert (error <= _ulp(exact, low) + 1e-5).all(), (
        f'{(error / _ulp(exact, low)).max():.2f} ulp')


@pytest.mark.parametrize('dtype', [torch.int64, torch.uint8, torch.bool,
                                   torch.complex64],
                         ids=lambda dtype: str(dtype)[len('torch.'):])
def test_non_float_input_is_refused_naming_its_dtype(dtype):
    x = torch.ones((2, C, 3, 3), dtype=dtype)
    for mean, var in COMBOS:
        norm = CollapsedNorm(C, sources=(mean, var))
        with pytest.raises(TypeError) as err:
            norm(x)
        assert str(err.value) == (f'CollapsedNorm expects a floating-point '
                                  f'input, got {dtype}')


def test_bn_picks_fold_into_the_conv_with_mmcv():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, C, 3), _frozen_ssn('BN', 'BN').float(), nn.ReLU(),
        nn.Conv2d(C, C, 1), _frozen_ssn('BN', 'IN', seed=1).float())
    x = torch.randn(2, 3, 8, 8)
    collapse_model(model)
    expected = model(x)
    exposed = expose_batch_norms(model)[1]
    assert isinstance(exposed, nn.BatchNorm2d) and exposed.eps == EPS
    fuse_conv_bn(model)
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    assert isinstance(model[4], CollapsedNorm)  # BN/IN depends on the input
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def _sn(mean_logits, var_logits):
    layer = SwitchableNorm2d(C).double().eval()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor(mean_logits))
        layer.var_weight.copy_(torch.tensor(var_logits))
        layer.running_var.fill_(1.5)
    return layer


def test_sn_layers_collapse_only_within_the_tolerance():
    model = nn.Sequential(_sn([0., 0., 9.], [9., 0., 0.]),
                          _frozen_ssn('LN', 'BN'))
    picks = plan_collapse(model)
    assert [p.collapse for p in picks] == [False, True]
    assert picks[0].distance == pytest.approx(2 * torch.e**-9, rel=1e-3)
    with pytest.raises(CollapseError, match=r'--sn-tolerance') as err:
        collapse_model(model)
    assert '0 (SN)' in str(err.value)
    assert isinstance(model[0], SwitchableNorm2d)  # nothing changed
    x = _input((4, C, 5, 5))
    expected = model(x)
    with pytest.raises(CollapseError):
        collapse_model(model, sn_tolerance=1e-4)
    picks = collapse_model(model, sn_tolerance=1e-3)
    assert (picks[0].mean, picks[0].var) == ('BN', 'IN')
    assert isinstance(model[0], CollapsedNorm)
    change = (model.double()(x) - expected).abs().max()
    assert 0 < change < 0.1
    # an SSN layer whose schedule did not finish is refused as well
    unfinished = _frozen_ssn('IN', 'IN')
    with torch.no_grad():
        unfinished.mean_fixed.zero_()
        unfinished.mean_weight.copy_(torch.tensor([0.4, 0.3, 0.3]))
    with pytest.raises(CollapseError, match=r'0 \(SSN\)'):
        collapse_model(nn.Sequential(unfinished))


def _trained_like(config, tmp_path, sn_logits=None):
    """The config's model with random weights, frozen random SSN picks (or
    SN logits) and running statistics, saved as an mmengine checkpoint."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmpretrain'), \
            torch.random.fork_rng():
        torch.manual_seed(3)    # the same weights in every run
        model = MODELS.build(cfg.model)
        model.init_weights()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if not isinstance(m, _SwitchableNorm):
                continue
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape,
                                             generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape,
                                           generator=g) + 0.5)
            if sn_logits is not None:
                m.mean_weight.copy_(torch.tensor(sn_logits))
                m.var_weight.copy_(torch.tensor(sn_logits[::-1]))
                continue
            for param, flag in ((m.mean_weight, m.mean_fixed),
                                (m.var_weight, m.var_fixed)):
                param.copy_(F.one_hot(torch.randint(3, (), generator=g), 3))
                flag.fill_(1)
    ckpt = tmp_path / 'trained.pth'
    torch.save(dict(meta=dict(dataset_meta=dict(classes=list('0123456789'))),
                    state_dict=model.state_dict()), ckpt)
    return model.eval(), str(ckpt)


LOAD_WITHOUT_MMSN = """
import json, sys
import torch
from mmpretrain.apis import init_model
model = init_model(sys.argv[1], sys.argv[2], device='cpu')
x = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(x, mode='tensor')
print(json.dumps(dict(
    mmsn=sorted(m for m in sys.modules if m.split('.')[0] == 'mmsn'),
    runtime='mmsn_runtime' in sys.modules,
    classes=model._dataset_meta.get('classes'),
    logits=logits.tolist())))
"""


def _run_without_mmsn(cfg_path, ckpt_path, x, tmp_path):
    torch.save(x, tmp_path / 'x.pt')
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, '-c', LOAD_WITHOUT_MMSN, cfg_path, ckpt_path,
         str(tmp_path / 'x.pt')], capture_output=True, text=True, env=env,
        cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _derived_config(tmp_path, name, text, base=SSN_DEMO):
    path = tmp_path / f'{name}.py'
    path.write_text(f'_base_ = [{base!r}]\n{text}')
    return str(path)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_tool_writes_a_model_that_runs_without_mmsn(tmp_path, capsys):
    # not SN's defaults: a rewrite that drops eps or unbiased must show
    config = _derived_config(
        tmp_path, 'ssn_digits_eps', 'model = dict(backbone=dict(norm_cfg='
        'dict(eps=0.01, unbiased=False)))\n')
    model, ckpt = _trained_like(config, tmp_path)
    out = tmp_path / 'deploy'
    # what killed runs left (the process is gone), and what a running one
    # writes (our parent process): only the former are removed
    out.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    left = [f'ssn_digits_eps_collapsed.pth.{dead}.partial',
            f'ssn_digits_eps_collapsed.py.{dead}.partial']
    kept = [f'ssn_digits_eps_collapsed.pth.{alive}.partial',
            f'other.pth.{dead}.partial']
    for name in left + kept:
        (out / name).write_bytes(b'partial')
    assert load_tool(TOOL).main([config, ckpt, str(out),
                                 '--input-shape', '1', '8', '8']) == 0
    printed = capsys.readouterr().out
    assert 'Largest change of the outputs' in printed
    # evaluation needs mmsn: every mmsn type left is named, with its places
    assert ('these parts of the config are mmsn\'s (add mmsn to '
            'custom_imports to use them, e.g. to evaluate with '
            'tools/test.py): ToGrayscale (transform, at test_pipeline[0], '
            'val_dataloader.dataset.pipeline[0], '
            'test_dataloader.dataset.pipeline[0]); SklearnDigits (dataset, '
            'at train_dataloader.dataset, val_dataloader.dataset, '
            'test_dataloader.dataset)\n') in printed
    cfg_path = str(out / 'ssn_digits_eps_collapsed.py')
    ckpt_path = str(out / 'ssn_digits_eps_collapsed.pth')
    assert sorted(p.name for p in out.iterdir()) == sorted(
        kept + [osp.basename(cfg_path), osp.basename(ckpt_path)])
    written = Config.fromfile(cfg_path, import_custom_modules=False)
    assert written.custom_imports.imports == ['mmsn_runtime']
    assert written.model.backbone.norm_cfg == dict(
        type='CollapsedNorm', eps=0.01, unbiased=False)
    assert written.custom_hooks == []
    assert 'constructor' not in written.optim_wrapper

    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    result = _run_without_mmsn(cfg_path, ckpt_path, x, tmp_path)
    assert result['mmsn'] == [] and result['runtime']
    assert result['classes'] == list('0123456789')
    with torch.no_grad():
        expected = model(x, mode='tensor')
    got = torch.tensor(result['logits'])
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-4
    assert expected.std() > 0.05    # the logits are spread, not constant


def test_ssn_resnet50_collapses_with_its_stem(tmp_path):
    """The ImageNet SSN config: ResNetStemPool and the plain head come from
    mmsn_runtime and mmpretrain, so the written model needs no mmsn."""
    config = osp.join(REPO, 'configs', 'resnet50_ssn_8xb32.py')
    model, ckpt = _trained_like(config, tmp_path)
    out = tmp_path / 'deploy'
    assert load_tool(TOOL).main([config, ckpt, str(out), '--batch-size',
                                 '1', '--input-shape', '3', '64', '64']) == 0
    written = Config.fromfile(str(out / 'resnet50_ssn_8xb32_collapsed.py'),
                              import_custom_modules=False)
    assert written.model.backbone.type == 'ResNetStemPool'
    assert written.model.head.type == 'LinearClsHead'
    assert 'dropout_rate' not in written.model.head
    assert written.custom_imports.imports == ['mmsn_runtime']


def test_sn_model_needs_the_tolerance_and_prints_the_price(tmp_path, capsys):
    _, ckpt = _trained_like(SN_DEMO, tmp_path, sn_logits=[0., 1., 8.])
    out = tmp_path / 'deploy'
    args = [SN_DEMO, ckpt, str(out), '--input-shape', '1', '8', '8']
    assert load_tool(TOOL).main(args) == 1
    err = capsys.readouterr().err
    assert '10 of 10 layers do not collapse' in err
    assert 'Nothing was written' in err and not out.exists()
    assert load_tool(TOOL).main(args + ['--sn-tolerance', '0.01']) == 0
    printed = capsys.readouterr().out
    change = float(printed.split('relative to their largest magnitude: ')
                   [1].split(')')[0])
    assert 0 < change < 0.5  # a real, printed price
    assert (out / 'resnet_sn_digits_collapsed.pth').exists()
    # the price on the first test batch, through the data preprocessor
    assert load_tool(TOOL).main([SN_DEMO, ckpt, str(out), '--sn-tolerance',
                                 '0.01', '--batch', 'dataset',
                                 '--batch-size', '3']) == 0
    printed = capsys.readouterr().out
    assert 'on a dataset batch of shape (3, 1, 8, 8): ' in printed, printed


def _refusal(args, capsys):
    """The tool's message for a refusal: ``error: <message>`` and
    ``Nothing was written.`` on stderr, exit status 1."""
    capsys.readouterr()     # what the test printed before
    code = load_tool(TOOL).main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == '', captured
    prefix, suffix = 'error: ', '\nNothing was written.\n'
    assert captured.err.startswith(prefix), captured.err
    assert captured.err.endswith(suffix), captured.err
    return captured.err[len(prefix):-len(suffix)]


def test_config_without_sn_is_refused(tmp_path, capsys):
    config = _derived_config(tmp_path, 'bn_digits', 'model = dict(backbone='
                             'dict(norm_cfg=dict(_delete_=True, type=\'BN\')))\n')
    out = tmp_path / 'deploy'
    assert _refusal([config, tmp_path / 'none.pth', out], capsys) == (
        f'{config} has no SN or SSN layer to collapse (no norm_cfg of a '
        f'Switchable Normalization type)')
    assert not out.exists()


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nobody may create files in: mode 0o555, or, for root (whom
    modes do not stop), the immutable attribute."""
    folder = tmp_path / 'locked'
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    proc = subprocess.run(['chattr', '+i', str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f'root cannot make a folder unwritable here (chattr +i: '
                    f'{proc.stderr.strip()})')
    try:
        with pytest.raises(PermissionError):
            (folder / 'probe').write_bytes(b'')
        yield folder
    finally:
        subprocess.run(['chattr', '-i', str(folder)], check=True)


def test_output_folder_that_cannot_be_written_is_refused_first(
        tmp_path, capsys, unwritable_folder):
    """Before the checkpoint is read (a missing one here): a file on the
    way, and a folder without write permission."""
    missing_ckpt = tmp_path / 'none.pth'
    a_file = tmp_path / 'a_file'
    a_file.write_text('not a folder')
    assert _refusal([SSN_DEMO, missing_ckpt, a_file / 'deploy'], capsys) == (
        f'Cannot write into {a_file / "deploy"}: {a_file} is a file, not a '
        f'folder')
    assert _refusal([SSN_DEMO, missing_ckpt, a_file], capsys) == (
        f'Cannot write into {a_file}: {a_file} is a file, not a folder')
    assert _refusal([SSN_DEMO, missing_ckpt, unwritable_folder / 'deploy'],
                    capsys) == (
        f'Cannot write into {unwritable_folder}: Operation not permitted'
        if os.geteuid() == 0 else
        f'Cannot write into {unwritable_folder}: Permission denied')
    assert a_file.read_text() == 'not a folder'
    assert list(unwritable_folder.iterdir()) == []
    assert _refusal([SSN_DEMO, missing_ckpt, tmp_path / 'deploy'],
                    capsys) == f'No checkpoint {missing_ckpt}'
    assert not (tmp_path / 'deploy').exists()


def test_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A disk that fills up while the checkpoint is written: the partial
    file and the folders made for the output are removed again."""
    _, ckpt = _trained_like(SSN_DEMO, tmp_path)
    save = torch.save

    def save_until_the_disk_is_full(obj, path):
        if str(path).endswith('.partial'):
            with open(path, 'wb') as f:
                f.write(b'PK\x03\x04 the first bytes')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        save(obj, path)

    monkeypatch.setattr(torch, 'save', save_until_the_disk_is_full)
    out = tmp_path / 'new' / 'deploy'
    assert _refusal([SSN_DEMO, ckpt, out, '--input-shape', '1', '8', '8'],
                    capsys) == (
        f'Cannot write {out / "resnet_ssn_digits_collapsed.pth"}: No space '
        f'left on device')
    assert not (tmp_path / 'new').exists()
    assert list(tmp_path.rglob('*.partial')) == []


class _Pickled:
    pass


def test_damaged_or_unfitting_checkpoint_is_refused(tmp_path, capsys):
    model, ckpt = _trained_like(SSN_DEMO, tmp_path)
    out = tmp_path / 'deploy'
    # 4 KiB of one tensor's bytes changed, as a bad download would
    name, tensor = max(model.state_dict().items(), key=lambda kv: kv[1].numel())
    data = bytearray(open(ckpt, 'rb').read())
    with zipfile.ZipFile(ckpt) as archive:
        record, = [info.filename for info in archive.infolist()
                   if archive.read(info) == tensor.numpy().tobytes()]
    start = bytes(data).index(tensor.numpy().tobytes()) + 64
    data[start:start + 4096] = bytes(b ^ 0x5A for b in data[start:start + 4096])
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes(bytes(data))
    assert _refusal([SSN_DEMO, damaged, out], capsys) == (
        f'{damaged} is damaged: its record {record!r} does not match what '
        f'was saved (Bad CRC-32 for file {record!r}). A download or copy '
        f'that went wrong, or a failing disk, changes bytes; get the file '
        f'again')
    # a pickled object: weights-only loading refuses it, without torch's
    # advice to load it unsafely
    pickled = tmp_path / 'pickled.pth'
    torch.save(dict(state_dict={}, meta=_Pickled()), pickled)
    assert _refusal([SSN_DEMO, pickled, out], capsys) == (
        f'Cannot read {pickled} as a checkpoint of tensors and mmengine\'s '
        f'own types (Unsupported global: GLOBAL {_Pickled.__module__}.'
        f'_Pickled was not an allowed global by default)')
    # an SN model's checkpoint for the SSN config
    _, sn_ckpt = _trained_like(SN_DEMO, tmp_path, sn_logits=[0., 1., 8.])
    message = _refusal([SSN_DEMO, sn_ckpt, out], capsys)
    assert message.startswith(
        f'{sn_ckpt} does not fit the model of {SSN_DEMO}: '), message
    assert 'backbone.layer1.0.ssn1.radius' in message, message
    assert not out.exists()


# Every type some mmsn module registers, found by importing them all.
EVERY_MMSN_TYPE = """
import importlib, json, pkgutil
import mmengine.registry, mmpretrain.registry
import mmsn
for module in pkgutil.walk_packages(mmsn.__path__, 'mmsn.'):
    importlib.import_module(module.name)
types = set()
for owner in (mmengine.registry, mmpretrain.registry):
    for registry in vars(owner).values():
        if isinstance(registry, mmengine.registry.Registry):
            types |= {name for name, obj in registry.module_dict.items()
                      if getattr(obj, '__module__', '').startswith('mmsn.')}
print(json.dumps(sorted(types)))
"""

# collapsed_config in a process that only imported mmsn, as the tool runs
COLLAPSE_EVERY_TYPE = """
import json, sys
import mmsn
from mmengine.config import Config
from mmsn.deploy import collapsed_config
cfg = Config(dict(
    model=dict(type='ImageClassifier', backbone=dict(
        type='ResNet', depth=18, norm_cfg=dict(type='SN'))),
    leftovers=[dict(type=name) for name in json.loads(sys.argv[1])]))
print(json.dumps(collapsed_config(cfg)[1]))
"""


def _python(code, *args):
    proc = subprocess.run([sys.executable, '-c', code, *args],
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_mmsn_type_left_in_the_config_is_named():
    """The report names each mmsn type the collapsed config still uses,
    whether or not ``import mmsn`` registered it (``ToGrayscale`` is
    registered only when the digits dataset is imported)."""
    every = _python(EVERY_MMSN_TYPE)
    assert {'ToGrayscale', 'SklearnDigits', 'PreActResNet', 'SSN',
            'SNBatchAverageHook'} <= set(every)
    report = _python(COLLAPSE_EVERY_TYPE, json.dumps(every))
    norms = {name for name in every
             if name.startswith(('SN', 'SSN', 'SyncSN', 'SyncSSN'))
             and not name.endswith('Hook')}
    named = [entry.split(' (')[0] for entry in report['others_need_mmsn']]
    assert sorted(named) == sorted(
        set(every) - norms - set(PLAIN_EQUIVALENTS))
    assert len(report['norms']) == 1 + len(norms)
    assert report['model_needs_mmsn'] == []


def test_fallback_when_the_model_needs_mmsn():
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'resnet50v2_sn_8xb32.py'))
    new, report = collapsed_config(cfg)
    assert report['norms'] == ['model.backbone.norm_cfg']
    assert any('PreActResNet' in t for t in report['model_needs_mmsn'])
    assert new.custom_imports.imports == ['mmsn_runtime', 'mmsn']


def test_tool_takes_a_config_by_its_file_name(tmp_path, capsys,
                                              monkeypatch):
    """As mim does (``mim run mmsn collapse_norms NAME.py ...``): one of
    mmsn's configs by its file name, from any folder; an unknown name is a
    refusal that suggests the close ones."""
    _, ckpt = _trained_like(SSN_DEMO, tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'deploy'
    assert load_tool(TOOL).main(['resnet_ssn_digits', ckpt, str(out),
                                 '--input-shape', '1', '8', '8']) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        'resnet_ssn_digits_collapsed.pth', 'resnet_ssn_digits_collapsed.py']
    written = Config.fromfile(str(out / 'resnet_ssn_digits_collapsed.py'),
                              import_custom_modules=False)
    assert written.model.backbone.norm_cfg.type == 'CollapsedNorm'

    message = _refusal(['resnet_ssn_digit.py', ckpt, tmp_path / 'typo'],
                       capsys)
    assert message.startswith("'resnet_ssn_digit.py' is neither a file nor "
                              "the name of a config among mmsn's configs")
    assert 'did you mean resnet_ssn_digits.py' in message
    assert not (tmp_path / 'typo').exists()
