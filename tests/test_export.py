"""An eval SN or SSN network (mmpretrain's ResNet_CIFAR-18), and an SSN
network collapsed into the norms it picked, export with torch.jit.trace,
torch.export and both ONNX exporters (TorchScript-based, as mmdeploy uses,
and dynamo), and the exported programs and onnxruntime give the eager
logits. While a tracer or exporter records, SN takes its composite path
(plain ops): no custom autograd Function or mmsn._C op in the graphs.
"""
import warnings

import onnxruntime as ort
import pytest
import torch
from mmpretrain.models import ResNet_CIFAR
from torch import nn

from mmsn import SparseSwitchableNorm2d, SwitchableNorm2d
from mmsn.deploy import collapse_model
from mmsn.models.norms.switchable_norm import _SwitchableNorm

ATOL = 1e-5


def assert_logits(actual, expected):
    """Within 1e-5, relative to the logits' scale where it exceeds 1 (float32
    rounds logits of 30 to about 4e-6)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=ATOL * scale, rtol=0)


class NormResNet(nn.Module):

    def __init__(self, norm_type):
        super().__init__()
        self.backbone = ResNet_CIFAR(depth=18, norm_cfg=dict(type=norm_type))
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def trained(norm_type):
    """A model trained for two steps, so that every norm layer has its own
    parameters and running statistics."""
    torch.manual_seed(0)
    net = NormResNet(norm_type)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
    return net


def ssn_model(collapsed):
    """SSN mid-schedule (radius 0.3: SparsestMax of unequal logits, some
    layers mixing two or three norms), or with every layer one-hot (a
    finished schedule) and collapsed into the norms it picked."""
    net = trained('SSN')
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, SparseSwitchableNorm2d):
                layer.radius.fill_(0.3)
                for p in (layer.mean_weight, layer.var_weight):
                    if collapsed:
                        p.copy_(torch.nn.functional.one_hot(
                            torch.randint(3, (), generator=g), 3).float())
                    else:
                        p.copy_(torch.randn(3, generator=g))
    net.eval()
    if collapsed:
        picks = collapse_model(net)
        assert picks and all(p.collapse for p in picks)
        assert not any(isinstance(m, _SwitchableNorm)
                       for m in net.modules())
    return net


MODELS = {
    'SN': lambda: trained('SN').eval(),
    'SSN': lambda: ssn_model(collapsed=False),
    'SSN-collapsed': lambda: ssn_model(collapsed=True),
}


@pytest.fixture(scope='module', params=list(MODELS))
def model(request):
    return MODELS[request.param]()


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
    assert_logits(traced(x), eager(model, x))
    # the trace holds for another batch size
    x5 = inputs(5, seed=2)
    assert_logits(traced(x5), eager(model, x5))


def test_torch_export(model):
    x = inputs()
    program = torch.export.export(model, (x, ))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any('mmsn' in t or 'autograd_function' in t for t in targets)
    assert_logits(program.module()(x), eager(model, x))


def test_onnx_torchscript_exporter(model, tmp_path):
    x = inputs()
    path = tmp_path / 'resnet.onnx'
    torch.onnx.export(model, (x, ), str(path), dynamo=False,
                      input_names=['x'], dynamic_axes={'x': {0: 'batch'}})
    assert_logits(onnx_logits(path, x), eager(model, x))
    x5 = inputs(5, seed=2)
    assert_logits(onnx_logits(path, x5), eager(model, x5))


def test_onnx_dynamo_exporter(model, tmp_path):
    x = inputs()
    path = tmp_path / 'resnet_dynamo.onnx'
    torch.onnx.export(model, (x, ), str(path), dynamo=True)
    assert_logits(onnx_logits(path, x), eager(model, x))


@pytest.mark.parametrize('dynamo', [False, True])
def test_fresh_layer_exports_to_onnx(dynamo, tmp_path):
    """A fresh layer: its weight equals its running_var and its bias its
    running_mean, which the TorchScript exporter merges into one
    initializer each."""
    layer = SwitchableNorm2d(8).eval()
    x = torch.randn(2, 8, 5, 5)
    path = tmp_path / 'sn.onnx'
    torch.onnx.export(layer, (x, ), str(path), dynamo=dynamo)
    assert_logits(onnx_logits(path, x), eager(layer, x))
