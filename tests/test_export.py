"""An eval SN network (mmpretrain's ResNet_CIFAR-18 with SN) exports with
torch.jit.trace, torch.export and both ONNX exporters (TorchScript-based, as
mmdeploy uses, and dynamo), and the exported programs and onnxruntime give
the eager logits. While a tracer or exporter records, SN takes its composite
path (plain ops): no custom autograd Function or mmsn._C op in the graphs.
"""
import warnings

import onnxruntime as ort
import pytest
import torch
from mmpretrain.models import ResNet_CIFAR
from torch import nn

from mmsn import SwitchableNorm2d

ATOL = 1e-5


class SNResNet(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = ResNet_CIFAR(depth=18, norm_cfg=dict(type='SN'))
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.backbone(x)[-1].mean((2, 3)))


@pytest.fixture(scope='module')
def model():
    """A model trained for two steps, so that every SN layer has its own
    parameters and running statistics."""
    torch.manual_seed(0)
    net = SNResNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
    return net.eval()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g)


def eager(net, x):
    with torch.no_grad():
        return net(x)


def onnx_logits(path, x):
    session = ort.InferenceSession(str(path),
                                   providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


@pytest.fixture(autouse=True)
def quiet_tracer():
    # shape checks become constants in a trace; expected here
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        yield


def test_jit_trace(model):
    x = inputs()
    traced = torch.jit.trace(model, x)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert 'prim::PythonOp' not in kinds
    assert not any(kind.startswith('mmsn::') for kind in kinds)
    torch.testing.assert_close(traced(x), eager(model, x), atol=ATOL, rtol=0)
    # the trace holds for another batch size
    x5 = inputs(5, seed=2)
    torch.testing.assert_close(traced(x5), eager(model, x5), atol=ATOL,
                               rtol=0)


def test_torch_export(model):
    x = inputs()
    program = torch.export.export(model, (x, ))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any('mmsn' in t or 'autograd_function' in t for t in targets)
    torch.testing.assert_close(program.module()(x), eager(model, x),
                               atol=ATOL, rtol=0)


def test_onnx_torchscript_exporter(model, tmp_path):
    x = inputs()
    path = tmp_path / 'sn_resnet.onnx'
    torch.onnx.export(model, (x, ), str(path), dynamo=False,
                      input_names=['x'], dynamic_axes={'x': {0: 'batch'}})
    torch.testing.assert_close(onnx_logits(path, x), eager(model, x),
                               atol=ATOL, rtol=0)
    x5 = inputs(5, seed=2)
    torch.testing.assert_close(onnx_logits(path, x5), eager(model, x5),
                               atol=ATOL, rtol=0)


def test_onnx_dynamo_exporter(model, tmp_path):
    x = inputs()
    path = tmp_path / 'sn_resnet_dynamo.onnx'
    torch.onnx.export(model, (x, ), str(path), dynamo=True)
    torch.testing.assert_close(onnx_logits(path, x), eager(model, x),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize('dynamo', [False, True])
def test_fresh_layer_exports_to_onnx(dynamo, tmp_path):
    """A fresh layer: its weight equals its running_var and its bias its
    running_mean, which the TorchScript exporter merges into one
    initializer each."""
    layer = SwitchableNorm2d(8).eval()
    x = torch.randn(2, 8, 5, 5)
    path = tmp_path / 'sn.onnx'
    torch.onnx.export(layer, (x, ), str(path), dynamo=dynamo)
    torch.testing.assert_close(onnx_logits(path, x), eager(layer, x),
                               atol=ATOL, rtol=0)
