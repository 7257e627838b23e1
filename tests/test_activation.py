"""ReLU, Sigmoid, Tanh, STanh and Activation(mode) against a float64 torch reference."""
import pytest
import torch

import native_layers as nl
from tests.layer_checks import assert_close, leaf64

REFERENCE = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "stanh": lambda x: 1.7159 * torch.tanh(x * 2 / 3)}


def _check(module, mode, x, dtype=torch.float32):
    y = module(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = leaf64(x)
    ref = REFERENCE[mode](x64)
    ref.backward(g.double().cpu())
    assert_close(y, ref, dtype, f"{mode} output")
    assert_close(x.grad, x64.grad, dtype, f"{mode} grad")


@pytest.mark.parametrize("mode", ["relu", "sigmoid", "tanh", "stanh"])
@pytest.mark.parametrize("shape", [(3, 1037), (1,), (4, 0, 3)])
def test_activation_matches_reference(layer_device, mode, shape):
    torch.manual_seed(len(shape))
    # Large magnitudes too: the kernels' sigmoid/tanh must not overflow.
    x = (torch.randn(shape, device=layer_device) * 6).requires_grad_()
    _check(nl.Activation(mode), mode, x)


@pytest.mark.parametrize("module,mode", [(nl.ReLU, "relu"), (nl.Sigmoid, "sigmoid"), (nl.Tanh, "tanh"),
                                         (nl.STanh, "stanh")])
def test_activation_modules_non_contiguous(layer_device, module, mode):
    torch.manual_seed(7)
    x = torch.randn(40, 31, device=layer_device).t()[::2].requires_grad_()
    assert not x.is_contiguous()
    _check(module(), mode, x)


def test_modules_subclass_torch_and_reject_unknown_modes():
    assert isinstance(nl.ReLU(), torch.nn.ReLU)
    assert isinstance(nl.Sigmoid(), torch.nn.Sigmoid) and isinstance(nl.Tanh(), torch.nn.Tanh)
    with pytest.raises(ValueError, match="mode"):
        nl.Activation("gelu")


def test_inplace_relu(layer_device):
    torch.manual_seed(8)
    base = torch.randn(6, 7, device=layer_device, requires_grad=True)
    x = base * 1.0
    y = nl.ReLU(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    y.sum().backward()
    assert_close(y, torch.relu(base.double()))
    assert_close(base.grad, (base > 0).double())


@pytest.mark.parametrize("mode", ["relu", "sigmoid", "tanh", "stanh"])
def test_activation_cpu_path_gradcheck(mode, monkeypatch):
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    torch.manual_seed(9)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x.data[x.data.abs() < 1e-3] = 0.5  # keep away from ReLU's kink, where finite differences disagree
    assert torch.autograd.gradcheck(lambda x: nl.activation(x, mode), (x,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["relu", "sigmoid", "tanh", "stanh"])
def test_activation_gpu_dtypes(dtype, mode):
    torch.manual_seed(10)
    x = (torch.randn(129, 1000, device="cuda") * 3).to(dtype).requires_grad_()
    _check(nl.Activation(mode), mode, x, dtype)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activation_half_precision_kernels(layer_device, dtype):
    torch.manual_seed(11)
    for mode in REFERENCE:
        x = (torch.randn(7, 129, device=layer_device) * 3).to(dtype).requires_grad_()
        _check(nl.Activation(mode), mode, x, dtype)
