"""The importance plot tool and the training hook that logs the shares."""
import csv
import importlib.util
import json
import os.path as osp

import pytest
import torch
from mmengine.model import BaseModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmsn  # noqa: F401
from mmsn.analysis import (collect_importance, flagged_layers, format_table,
                           importance_scalars)
from mmsn.models import SwitchableNorm2d

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'analysis', 'plot_importance.py')

SMALL_CONFIG = """
default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmsn'], allow_failed_imports=False)
model = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet_CIFAR', depth=18, in_channels=1,
                  stem_channels=8, base_channels=8, num_stages=1,
                  strides=(1, ), dilations=(1, ), out_indices=(0, ),
                  norm_cfg=dict(type='SN', moving_average={ema})),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=8))
"""


def load_tool():
    spec = importlib.util.spec_from_file_location('plot_importance', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(config):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(Config.fromfile(config).model)


@pytest.mark.parametrize('ema', [True, False])
def test_plot_tool(tmp_path, capsys, ema):
    config = tmp_path / 'small.py'
    config.write_text(SMALL_CONFIG.format(ema=ema))
    model = build(str(config))
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, SwitchableNorm2d)]
    assert len(layers) == 5  # stem + 2 blocks x 2
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in layers:
            m.mean_weight.copy_(torch.randn(3, generator=gen))
            m.var_weight.copy_(torch.randn(3, generator=gen))
        # layer1.0.sn2 leans on BN (share ~0.84), the others are below 0.3.
        for name, m in layers:
            if name == 'backbone.layer1.0.sn2':
                m.mean_weight.copy_(torch.tensor([0., 0., 2.5]))
            else:
                m.mean_weight[2] = -1.5
                m.var_weight[2] = -1.5
    ckpt = tmp_path / 'small.pth'
    torch.save(dict(state_dict=model.state_dict()), str(ckpt))
    out = tmp_path / 'plots' / 'importance.png'

    assert load_tool().main([str(config), str(ckpt), '--out', str(out)]) == 0
    printed = capsys.readouterr().out

    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert out.stat().st_size > 10_000
    with open(tmp_path / 'plots' / 'importance.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['layer'] for r in rows] == [n for n, _ in layers]
    for row, (_, m) in zip(rows, layers):
        mean = torch.softmax(m.mean_weight.detach(), 0)
        var = torch.softmax(m.var_weight.detach(), 0)
        got_mean = [float(row[f'mean_{b}']) for b in ('in', 'ln', 'bn')]
        got_var = [float(row[f'var_{b}']) for b in ('in', 'ln', 'bn')]
        assert got_mean == pytest.approx(mean.tolist(), abs=1e-6)
        assert got_var == pytest.approx(var.tolist(), abs=1e-6)
        assert row['moving_average'] == str(int(ema))
    # Only the BN-heavy layer of the moving-average model is flagged.
    flags = {r['layer']: r['use_batch_average'] for r in rows}
    assert flags.pop('backbone.layer1.0.sn2') == ('1' if ema else '0')
    assert set(flags.values()) == {'0'}
    flagged_lines = [line for line in printed.splitlines() if '<-' in line]
    if ema:
        assert len(flagged_lines) == 1
        assert 'backbone.layer1.0.sn2' in flagged_lines[0]
        assert '1 of 5 SN layers' in printed
    else:
        assert not flagged_lines
        assert 'No moving-average SN layer' in printed


def test_plot_tool_refuses_mismatched_checkpoint(tmp_path):
    config = tmp_path / 'small.py'
    config.write_text(SMALL_CONFIG.format(ema=True))
    model = build(str(config))
    state = {
        k: v
        for k, v in model.state_dict().items() if 'mean_weight' not in k
    }
    ckpt = tmp_path / 'partial.pth'
    torch.save(dict(state_dict=state), str(ckpt))
    with pytest.raises(RuntimeError, match='mean_weight'):
        load_tool().main(
            [str(config), str(ckpt), '--out',
             str(tmp_path / 'x.png')])


def test_layers_without_bn_branch():
    model = nn.Sequential(
        SwitchableNorm2d(4, using_bn=False), SwitchableNorm2d(4))
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([0., 0., 3.]))
    records = collect_importance(model)
    assert [r.branches for r in records] == [('IN', 'LN'),
                                             ('IN', 'LN', 'BN')]
    assert records[0].mean == pytest.approx((0.5, 0.5))
    assert records[0].bn_share is None
    assert [r.name for r in flagged_layers(records)] == ['1']
    scalars = importance_scalars(records)
    assert 'sn_importance/0/mean_bn' not in scalars
    assert scalars['sn_importance/0/var_ln'] == pytest.approx(0.5)
    # The BN average is over the layers that have the branch only.
    assert scalars['sn_importance/avg/mean_bn'] == pytest.approx(
        records[1].mean[2])
    table = format_table(records)
    assert table.splitlines()[2].count('-') >= 2  # empty BN cells


@pytest.mark.parametrize('mean_bn,var_bn,flagged', [
    (0.2, 0.2, False),
    (0.5, 0.2, True),   # the mean leans on BN
    (0.2, 0.5, True),   # the variance leans on BN
    (0.29, 0.29, False),  # both just below the threshold
])
def test_flag_looks_at_mean_and_variance_shares(mean_bn, var_bn, flagged):
    def logits(bn_share):
        # IN and LN split the rest evenly
        rest = (1 - bn_share) / 2
        return torch.tensor([rest, rest, bn_share]).log()

    layer = SwitchableNorm2d(4)
    with torch.no_grad():
        layer.mean_weight.copy_(logits(mean_bn))
        layer.var_weight.copy_(logits(var_bn))
    record, = collect_importance(layer)
    assert record.mean[2] == pytest.approx(mean_bn)
    assert record.var[2] == pytest.approx(var_bn)
    assert record.should_use_batch_average() is flagged
    assert bool(flagged_layers([record])) is flagged
    # a batch-average layer is never flagged
    layer.moving_average = False
    assert not flagged_layers(collect_importance(layer))


# -- the hook in a real (tiny) training run ----------------------------------
class ToySN(BaseModel):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.sn = SwitchableNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, inputs, labels, mode='tensor'):
        logits = self.fc(self.sn(self.conv(inputs)).relu().mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        return logits


class ToyData(Dataset):

    def __len__(self):
        return 16

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn((1, 6, 6), generator=gen) + i % 2,
                    labels=i % 2)


def test_hook_logs_shares_to_visualizer(tmp_path):
    from mmengine.runner import Runner
    runner = Runner(
        model=ToySN(),
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(ToyData(), batch_size=4, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=6),
        # A large learning rate so that the shares visibly move.
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=1.0)),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=2)),
        custom_hooks=[dict(type='SNImportanceLoggerHook', interval=3)],
        visualizer=dict(
            type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]),
        default_scope='mmengine')
    runner.train()

    files = list(tmp_path.glob('*/vis_data/scalars.json'))
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    share_lines = [x for x in lines if 'sn_importance/sn/mean_bn' in x]
    # Step 0 (before training), then every 3 iterations.
    assert [x['step'] for x in share_lines] == [0, 3, 6]
    assert share_lines[0]['sn_importance/sn/mean_in'] == pytest.approx(1 / 3)
    final = runner.model.sn.importance()
    last = share_lines[-1]
    for kind, shares in zip(('mean', 'var'), final):
        for branch, share in zip(('in', 'ln', 'bn'), shares.tolist()):
            assert last[f'sn_importance/sn/{kind}_{branch}'] == \
                pytest.approx(share, abs=1e-6)
            assert last[f'sn_importance/avg/{kind}_{branch}'] == \
                pytest.approx(share, abs=1e-6)
    assert abs(last['sn_importance/sn/mean_bn'] - 1 / 3) > 1e-4
    # The loss is logged by the same backend.
    assert any('loss' in x for x in lines)
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'SN importance, average over 1 layers' in log
    assert 'SN importance after training' in log


def test_ssn_layers_report_their_picks(tmp_path, capsys):
    from mmsn import SparseSwitchableNorm2d
    from mmsn.analysis import format_picks
    model = nn.Sequential(
        SparseSwitchableNorm2d(4), SparseSwitchableNorm2d(4),
        SwitchableNorm2d(4))
    with torch.no_grad():
        model[0].mean_weight.copy_(torch.tensor([0., 0., 3.]))  # BN
        model[0].var_weight.copy_(torch.tensor([2., 0., 0.]))  # IN
        model[1].radius.fill_(0.2)  # near the centre: not one-hot
        model[2].mean_weight.copy_(torch.tensor([0., 0., 3.]))
    records = collect_importance(model)
    assert [r.sparse for r in records] == [True, True, False]
    assert records[0].picks == ('BN', 'IN')
    assert records[0].mean == (0.0, 0.0, 1.0)
    assert records[1].picks == (None, None)
    # the batch-average advice is SN's: SSN's recipe uses moving averages
    assert [r.name for r in flagged_layers(records)] == ['2']
    table = format_table(records).splitlines()
    assert table[2].endswith('BN/IN') and table[3].endswith('-/-')
    assert format_picks(records).splitlines()[2] == '| 0 | 0 | BN | IN |'


def test_advice_speaks_of_sn_layers_only():
    """SSN layers keep moving averages by their recipe: the advice neither
    flags nor counts them, and says that it leaves them out."""
    from mmsn import SparseSwitchableNorm2d
    from mmsn.analysis import batch_average_advice
    ssn, ssn2 = SparseSwitchableNorm2d(4), SparseSwitchableNorm2d(4)
    sn_ema = SwitchableNorm2d(4)
    sn_batch = SwitchableNorm2d(4, moving_average=False)
    with torch.no_grad():
        for m in (ssn, ssn2, sn_ema, sn_batch):
            m.mean_weight.copy_(torch.tensor([0., 0., 3.]))
    records = collect_importance(nn.Sequential(ssn, ssn2))
    assert records[0].moving_average and records[0].mean == (0., 0., 1.)
    assert batch_average_advice(records) == (
        "2 SSN layers are not checked for that advice: SSN's recipe keeps "
        "moving averages, whatever share BN gets.")
    records = collect_importance(nn.Sequential(ssn, sn_ema, sn_batch))
    assert batch_average_advice(records, 0.5) == (
        '1 of 2 SN layers use moving averages with a BN share above 0.5; '
        'the SN authors advise batch average there (norm_cfg '
        'moving_average=False, statistics filled by SNBatchAverageHook).\n'
        "1 SSN layer is not checked for that advice: SSN's recipe keeps "
        'moving averages, whatever share BN gets.')
    records = collect_importance(nn.Sequential(sn_batch))
    assert batch_average_advice(records, 0.5) == (
        'No moving-average SN layer has a BN share above 0.5.')


def test_plot_tool_on_an_ssn_config_given_by_name(tmp_path, capsys,
                                                  monkeypatch):
    """The issue's case: `mim run mmsn plot_importance NAME.py CKPT` passes
    the config's file name; an SSN model that picked BN with moving
    averages is not reported as having no BN share above the threshold."""
    from mmsn import SparseSwitchableNorm2d
    model = build(osp.join(REPO, 'configs', 'demo', 'resnet_ssn_digits.py'))
    layers = [m for m in model.modules()
              if isinstance(m, SparseSwitchableNorm2d)]
    with torch.no_grad():
        for m in layers:
            m.mean_weight.copy_(torch.tensor([0., 0., 3.]))
            m.var_weight.copy_(torch.tensor([0., 3., 0.]))
    ckpt = tmp_path / 'ssn.pth'
    torch.save(dict(state_dict=model.state_dict()), str(ckpt))
    monkeypatch.chdir(tmp_path)
    assert load_tool().main(
        ['resnet_ssn_digits.py', str(ckpt), '--out', 'ssn.png']) == 0
    printed = capsys.readouterr().out
    assert 'No moving-average SN layer' not in printed
    assert (f"{len(layers)} SSN layers are not checked for that advice: "
            "SSN's recipe keeps moving averages, whatever share BN gets."
            ) in printed
    rows = [line.split() for line in printed.splitlines()
            if 'backbone.' in line]
    assert len(rows) == len(layers)
    # mean shares IN LN BN, variance shares IN LN BN, EMA, picked
    assert {tuple(r[2:]) for r in rows} == {
        ('0.000', '0.000', '1.000', '0.000', '1.000', '0.000', 'yes',
         'BN/LN')}
