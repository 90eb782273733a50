"""SNBatchAverageHook in a real (tiny) training run."""
import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader

import mmsn  # noqa: F401  (registers the hook)
from mmsn import SwitchableNorm2d
from sn_reference import batch_stats
from test_importance import ToyData as Data

BATCH = 4
FILL_SAMPLES = 8  # two batches


class Net(BaseModel):
    """A batch-average SN between a BN and a moving-average SN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.sn_batch = SwitchableNorm2d(4, moving_average=False)
        self.bn = nn.BatchNorm2d(4)
        self.sn_moving = SwitchableNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, inputs, labels, mode='tensor'):
        h = self.sn_moving(self.bn(self.sn_batch(self.conv(inputs)).relu()))
        logits = self.fc(h.relu().mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        return logits


class Recorder(Hook):
    """Keeps the model's state after each training iteration (the last one
    is what training left) and the inputs of the batch-average layer."""

    def before_run(self, runner):
        self.inputs = []
        runner.model.sn_batch.register_forward_hook(
            lambda m, args, out: self.inputs.append(args[0].detach()))

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.state = {
            k: v.clone()
            for k, v in runner.model.state_dict().items()
        }
        self.inputs_seen_in_training = len(self.inputs)


def test_hook_fills_batch_average_sn_only(tmp_path):
    recorder = Recorder()
    runner = Runner(
        model=Net(),
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(Data(), batch_size=BATCH, shuffle=False),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=2)),
        custom_hooks=[
            dict(type='SNBatchAverageHook', num_samples=FILL_SAMPLES,
                 interval=2), recorder
        ],
        default_scope='mmengine')
    runner.train()
    model = runner.model

    # the fill ran the first FILL_SAMPLES training samples through the final
    # weights, after the last training iteration
    fill_inputs = recorder.inputs[recorder.inputs_seen_in_training:]
    assert len(fill_inputs) == FILL_SAMPLES // BATCH
    loader = DataLoader(Data(), batch_size=BATCH, shuffle=False)
    for batch, seen in zip(loader, fill_inputs):
        expected = model.conv(batch['inputs'])
        torch.testing.assert_close(seen, expected)
    stats = [batch_stats(x.double(), unbiased=True) for x in fill_inputs]
    mean = torch.stack([m for m, _ in stats]).mean(0)
    second = torch.stack([v + m**2 for m, v in stats]).mean(0)
    layer = model.sn_batch
    torch.testing.assert_close(layer.running_mean.double(), mean,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), second - mean**2,
                               rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == len(fill_inputs)

    # everything else is as training left it: weights, BN and the
    # moving-average SN
    for key, value in model.state_dict().items():
        if not key.startswith('sn_batch.') or key in (
                'sn_batch.weight', 'sn_batch.bias', 'sn_batch.mean_weight',
                'sn_batch.var_weight'):
            assert torch.equal(value, recorder.state[key]), key
    # the checkpoint written after the fill holds the filled statistics
    saved = torch.load(tmp_path / 'epoch_2.pth', weights_only=False)
    assert torch.equal(saved['state_dict']['sn_batch.running_var'],
                       layer.running_var)
    assert torch.equal(saved['state_dict']['bn.running_var'],
                       recorder.state['bn.running_var'])
