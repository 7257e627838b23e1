"""Linear (InnerProduct) and its fused activation epilogue against a float64 torch reference."""
import pytest
import torch
import torch.nn.functional as F

import native_layers as nl
from tests.layer_checks import assert_close, leaf64

ACTS = {None: lambda z: z, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _check(x, weight, bias, activation, dtype=torch.float32):
    """Forward and every gradient of native linear against torch in float64 on the same values."""
    y = nl.linear(x, weight, bias, activation)
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64 = leaf64(x), leaf64(weight)
    b64 = leaf64(bias) if bias is not None else None
    ref = ACTS[activation](F.linear(x64, w64, b64))
    ref.backward(g.double().cpu())
    assert_close(y, ref, dtype, "output")
    if x.requires_grad:
        assert_close(x.grad, x64.grad, dtype, "grad input")
    assert_close(weight.grad, w64.grad, dtype, "grad weight")
    if bias is not None:
        assert_close(bias.grad, b64.grad, dtype, "grad bias")


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("rows,fin,fout", [(37, 45, 29), (1, 1, 1), (70, 33, 65)])
def test_linear_matches_reference(layer_device, activation, rows, fin, fout):
    torch.manual_seed(rows + fin)
    x = torch.randn(rows, fin, device=layer_device, requires_grad=True)
    w = (torch.randn(fout, fin, device=layer_device) / fin**0.5).requires_grad_()
    b = torch.randn(fout, device=layer_device, requires_grad=True)
    _check(x, w, b, activation)


def test_linear_non_contiguous_operands(layer_device):
    torch.manual_seed(1)
    x = torch.randn(50, 41, device=layer_device)[::2, 3:36].requires_grad_()  # strided rows and columns
    w = torch.randn(33, 19, device=layer_device).t().requires_grad_()  # a transposed weight (19 x 33)
    assert not x.is_contiguous() and not w.is_contiguous()
    _check(x, w, None, "relu")


def test_linear_empty_batch_and_leading_dims(layer_device):
    torch.manual_seed(2)
    lin = nl.Linear(9, 5, activation="tanh").to(layer_device)
    x = torch.randn(0, 9, device=layer_device, requires_grad=True)
    y = lin(x)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))
    assert torch.equal(lin.bias.grad, torch.zeros_like(lin.bias))
    x3 = torch.randn(2, 3, 9, device=layer_device)
    ref = torch.tanh(F.linear(x3.double(), lin.weight.double(), lin.bias.double()))
    assert_close(lin(x3), ref)


def test_linear_module_is_a_drop_in_nn_linear():
    torch.manual_seed(3)
    ref = torch.nn.Linear(6, 4)
    native = nl.Linear(6, 4)
    assert isinstance(native, torch.nn.Linear)
    native.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(native(x), ref(x))
    ref.load_state_dict(nl.Linear(6, 4, bias=True, activation="relu").state_dict())
    assert list(nl.Linear(6, 4, bias=False).state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="activation"):
        nl.Linear(6, 4, activation="gelu")
    with pytest.raises(ValueError, match="in_features=6"):
        native(torch.randn(5, 7))
    with pytest.raises(TypeError, match="dtype"):
        native(torch.randn(5, 6, dtype=torch.float64))


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
def test_linear_cpu_path_gradcheck(activation, monkeypatch):
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    torch.manual_seed(4)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: nl.linear(x, w, b, activation), (x, w, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_linear_gpu_dtypes(dtype, activation):
    torch.manual_seed(5)
    x = torch.randn(300, 257, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(129, 257, device="cuda", dtype=dtype) / 16).requires_grad_()
    b = torch.randn(129, device="cuda", dtype=dtype, requires_grad=True)
    _check(x, w, b, activation, dtype)


@pytest.mark.gpu
def test_linear_under_autocast_runs_in_half_precision():
    torch.manual_seed(6)
    lin = nl.Linear(64, 32, activation="relu").cuda()
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = torch.relu(F.linear(x.double(), lin.weight.double(), lin.bias.double()))
    assert_close(y, ref, torch.bfloat16)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_half_precision_kernels(layer_device, dtype):
    """The kernels in half precision with float32 accumulation (interpreter on CPU, or the GPU)."""
    torch.manual_seed(7)
    x = torch.randn(37, 45, device=layer_device).to(dtype).requires_grad_()
    w = (torch.randn(29, 45, device=layer_device) / 7).to(dtype).requires_grad_()
    b = torch.randn(29, device=layer_device).to(dtype).requires_grad_()
    _check(x, w, b, "sigmoid", dtype)


def test_linear_gradients_only_where_asked(layer_device):
    torch.manual_seed(8)
    x = torch.randn(6, 5, device=layer_device)
    w = torch.randn(4, 5, device=layer_device)
    b = torch.randn(4, device=layer_device, requires_grad=True)
    nl.linear(x, w, b, "tanh").sum().backward()  # frozen weight, trainable bias
    ref = (1 - torch.tanh(F.linear(x.double(), w.double(), b.detach().double())) ** 2).sum(0)
    assert_close(b.grad, ref)
    w.requires_grad_()
    nl.linear(x, w, None, "relu").sum().backward()  # no bias at all
    assert_close(w.grad, ((F.linear(x.double(), w.double()) > 0).double().t() @ x.double()))
