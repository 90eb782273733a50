"""Choice of SN's path per call (MMSN_SN_PATH, defaults by device, clear
errors), the memory formats each path keeps (channels_last 4D and 5D, with
no copy of the input where the backend takes strided rows), and shape
propagation on the meta device."""
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

from mmsn import (SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d,
                  SyncSwitchableNorm)
from mmsn import ops as sn_ops
from mmsn.ops import library
from mmsn.ops import backends
from sn_reference import reference_sn
from sn_paths import PARAMS, PATHS, make_input, make_layer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, **env):
    """Run ``code`` in a fresh interpreter importing this checkout."""
    full_env = dict(os.environ, PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, '-c', code], env=full_env,
                          capture_output=True, text=True, timeout=300)


# --- choice of the path -----------------------------------------------------


def test_unknown_path_is_a_clear_error():
    with pytest.raises(ValueError, match="'fast' is not a path of SN.*"
                       'composite, native, generic, triton, compiled'):
        with backends.forced('fast'):
            pass


def test_environment_variable_is_checked_at_import_and_forces_the_path():
    bad = python('import mmsn', MMSN_SN_PATH='fused')
    assert bad.returncode != 0
    assert ("MMSN_SN_PATH='fused' is not a path of SN; use one of "
            'composite, native, generic, triton, compiled') in bad.stderr
    good = python('import torch; from mmsn.ops import backend_name; '
                  "print(backend_name('cpu'), backend_name('meta'))",
                  MMSN_SN_PATH='native')
    assert good.returncode == 0, good.stderr
    # shapes only on meta: the generic ops, whatever is forced
    assert good.stdout.split() == ['native', 'generic']


def test_default_paths_by_device():
    assert backends.forced_path() == ''
    assert backends.backend_name('cpu') == (
        'compiled' if sn_ops.compiled_kernels_available() else 'native')
    assert backends.backend_name(torch.device('meta')) == 'generic'
    # Triton where its backend imports, else generic ops
    assert backends.backend_name('cuda') in ('triton', 'generic')
    for path in ('native', 'generic', 'composite'):
        with backends.forced(path):
            assert backends.backend_name('cpu') == path
            assert backends.forced_path() == path
    assert backends.forced_path() == ''


@pytest.mark.parametrize('path,selections', [('', 0), ('compiled', 0),
                                             ('native', 1), ('generic', 1)])
def test_path_is_chosen_once_per_call(path, selections, monkeypatch):
    """The device's default path runs the layer operators (their kernels
    are chosen when registered: no choice per call); a forced other path
    chooses its backend once per call, forward and backward included."""
    calls = []
    select = backends.select

    def counting_select(x):
        calls.append(x.shape)
        return select(x)

    monkeypatch.setattr(backends, 'select', counting_select)
    layer = make_layer(SwitchableNorm2d)
    x = make_input((4, 6, 5, 3)).requires_grad_()
    with backends.forced(path):
        y = layer(x)
        y.sum().backward()
    assert len(calls) == selections
    assert ('SwitchableNormTrain' in y.grad_fn.name()) == (selections == 0)


def test_forced_compiled_on_another_device_is_a_clear_error():
    with backends.forced('compiled'):
        with pytest.raises(RuntimeError, match='CPU kernels only, got a '
                           'cuda tensor'):
            backends.backend_name('cuda')


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if backends._triton_backend() is None:
        pytest.skip(f'no Triton backend here: {backends._triton["error"]}')
    monkeypatch.setattr(backends, '_triton_interpreted', lambda: False)
    layer = make_layer(SwitchableNorm2d)
    with backends.forced('triton'):
        with pytest.raises(RuntimeError, match='MMSN_SN_PATH=triton on a CPU '
                           'tensor needs TRITON_INTERPRET=1'):
            layer(make_input((2, 6, 3, 3)))


def test_forced_triton_without_its_module_names_the_import_error(
        monkeypatch):
    # None in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, 'mmsn.ops.backends.triton', None)
    monkeypatch.setattr(backends, '_triton', {})
    layer = make_layer(SwitchableNorm2d)
    with backends.forced('triton'):
        with pytest.raises(RuntimeError, match='MMSN_SN_PATH=triton: '
                           'mmsn.ops.backends.triton could not be imported'):
            layer(make_input((2, 6, 3, 3)))
    assert backends.backend_name('cuda') == 'generic'


@pytest.fixture
def stub_triton_module(monkeypatch):
    """A stand-in for mmsn/ops/backends/triton.py whose TritonBackend runs
    the generic passes, to check how the Triton backend is picked up."""
    module = types.ModuleType('mmsn.ops.backends.triton')

    class TritonBackend(backends.GenericBackend):
        name = 'triton'

    module.TritonBackend = TritonBackend
    module.kernels_interpreted = lambda: True  # so CPU tensors may use it
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(backends, '_triton', {})
    return TritonBackend


def test_triton_backend_is_picked_up_when_it_imports(stub_triton_module,
                                                     monkeypatch):
    assert backends.backend_name('cuda') == 'triton'
    assert backends.backend_name('cpu') != 'triton'
    layer = make_layer(SwitchableNorm2d, torch.float64)
    x = make_input((4, 6, 5, 3), torch.float64)
    y_ref, _ = reference_sn(x, *(getattr(layer, n) for n in PARAMS),
                            (layer.running_mean, layer.running_var),
                            training=True)
    with backends.forced('triton'):
        assert isinstance(backends.select(x), stub_triton_module)
        torch.testing.assert_close(layer(x), y_ref)


# what mmsn.ops._extension says when the kernels cannot be had
REASON = ('mmsn could not load its compiled CPU kernels (ImportError: gone); '
          'SN on the CPU runs on PyTorch\'s own kernels instead: same '
          'results, slower')


@pytest.fixture
def without_compiled_kernels(monkeypatch):
    """As if mmsn._C were not built (or built against another torch)."""
    monkeypatch.setattr(backends, 'load_compiled_ops',
                        lambda: (None, REASON))
    monkeypatch.setattr(backends, '_compiled', {})
    monkeypatch.setattr(backends, '_warned_native', False)
    monkeypatch.setattr(library, '_LAYER_OPS', None)


def test_missing_compiled_kernels_warn_once_and_fall_back(
        without_compiled_kernels, monkeypatch):
    """The CPU path uses PyTorch's kernels, says so once, and gives the
    reference's numbers; MMSN_WITH_OPS=0 (an explicit choice) silences the
    warning; forcing the compiled path names the reason."""
    monkeypatch.delenv('MMSN_WITH_OPS', raising=False)
    layer = make_layer(SwitchableNorm2d, torch.float64)
    x = make_input((4, 6, 5, 3), torch.float64)
    y_ref, _ = reference_sn(x, *(getattr(layer, n) for n in PARAMS),
                            (layer.running_mean, layer.running_var),
                            training=True)
    assert not sn_ops.compiled_kernels_available()
    # the loader's reason, as it wrote it
    with pytest.warns(RuntimeWarning, match=re.escape(REASON)):
        y = layer(x)
    torch.testing.assert_close(y, y_ref)
    assert backends.backend_name('cpu') == 'native'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer(x)
        monkeypatch.setattr(backends, '_warned_native', False)
        monkeypatch.setenv('MMSN_WITH_OPS', '0')
        layer(x)
    with backends.forced('compiled'):
        with pytest.raises(RuntimeError, match='MMSN_SN_PATH=compiled: '
                           r'mmsn\._C could not be loaded \(' +
                           re.escape(REASON)):
            layer(x)


# --- memory formats ---------------------------------------------------------


LAYOUTS = [(SwitchableNorm2d, (3, 6, 5, 4), torch.channels_last),
           (SwitchableNorm3d, (2, 6, 3, 4, 5), torch.channels_last_3d)]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('cls,shape,fmt', LAYOUTS, ids=['4d', '5d'])
@pytest.mark.parametrize('training', [True, False])
def test_channels_last_output_keeps_the_format(path, cls, shape, fmt,
                                               training):
    layer = make_layer(cls, torch.float64).train(training)
    x = make_input(shape, torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    params = [getattr(layer, n).detach().clone().requires_grad_()
              for n in PARAMS]
    y_ref, _ = reference_sn(x_ref, *params, (layer.running_mean.clone(),
                                             layer.running_var.clone()),
                            training=training)
    y_ref.backward(g)
    xi = x.contiguous(memory_format=fmt).requires_grad_()
    with backends.forced(path):
        y = layer(xi)
    assert y.is_contiguous(memory_format=fmt)
    y.backward(g.contiguous(memory_format=fmt))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xi.grad, x_ref.grad)
    for name, p in zip(PARAMS, params):
        torch.testing.assert_close(getattr(layer, name).grad, p.grad)


@pytest.mark.parametrize('cls,shape,fmt',
                         [(SwitchableNorm2d, (4, 8, 16, 16),
                           torch.channels_last),
                          (SwitchableNorm3d, (2, 8, 4, 8, 8),
                           torch.channels_last_3d)], ids=['4d', '5d'])
def test_strided_backend_keeps_channels_last_without_copies(cls, shape, fmt):
    """The generic backend takes channels_last rows as they are: autograd
    keeps x itself (no contiguous copy), and y and dx come out in x's
    format."""
    layer = cls(shape[1])
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with backends.forced('generic'):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
    x_storage = x.untyped_storage()
    assert x_storage.data_ptr() in saved
    # besides x: O(N * C) statistics
    assert sum(saved.values()) <= 1.05 * x_storage.nbytes()
    assert y.is_contiguous(memory_format=fmt)
    dx, = torch.autograd.grad(y, x, torch.randn(shape).contiguous(
        memory_format=fmt))
    assert dx.is_contiguous(memory_format=fmt)


# --- meta device ------------------------------------------------------------


META_LAYERS = [(SwitchableNorm1d, (4, 6)), (SwitchableNorm1d, (4, 6, 5)),
               (SwitchableNorm2d, (4, 6, 5, 3)),
               (SwitchableNorm3d, (2, 6, 2, 3, 4)),
               (SyncSwitchableNorm, (4, 6, 5, 3))]


@pytest.mark.parametrize('cls,shape', META_LAYERS)
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('path', ['', 'compiled', 'composite'])
def test_meta_input_propagates_shapes(cls, shape, training, path):
    layer = cls(6, device='meta').train(training)
    x = torch.empty(shape, device='meta', requires_grad=True)
    with backends.forced(path):
        y = layer(x)
        y.sum().backward()
        with torch.no_grad():
            y_no_grad = layer(x)
    for t in (y, y_no_grad, x.grad, layer.weight.grad,
              layer.mean_weight.grad):
        assert t.is_meta
    assert y.shape == y_no_grad.shape == x.grad.shape == shape
    assert layer.weight.grad.shape == (6, )
    assert layer.mean_weight.grad.shape == layer.mean_weight.shape


@pytest.mark.parametrize('using_bn', [None, 'fixed', 'function'])
def test_meta_input_through_the_functional_entry_points(using_bn):
    x = torch.empty(3, 4, 5, 5, device='meta', dtype=torch.bfloat16)
    weight, bias = torch.ones(4, device='meta'), torch.zeros(4, device='meta')
    k = 2 if using_bn is None else 3
    logits = torch.zeros(k, device='meta', requires_grad=True)
    stats = {None: None,
             'fixed': (torch.zeros(4, device='meta'),
                       torch.ones(4, device='meta')),
             'function': sn_ops.batch_stats_from_instance}[using_bn]
    y = sn_ops.switchable_norm(x, weight, bias, logits, logits, stats)
    assert y.is_meta and y.shape == x.shape and y.dtype == torch.bfloat16
    shares = torch.full((k, ), 1 / k, device='meta')
    y = sn_ops.mixed_norm(x, weight, bias, shares, shares, stats)
    assert y.is_meta and y.shape == x.shape
