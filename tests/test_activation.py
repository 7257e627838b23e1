"""ReLU, Sigmoid, Tanh, STanh and Activation(mode) against a float64 torch reference."""
import pytest
import torch

import native_layers as nl
from tests.layer_checks import LAYOUTS, assert_close, kernel_launches, leaf64, with_layout

REFERENCE = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "stanh": lambda x: 1.7159 * torch.tanh(x * 2 / 3)}


def _check(module, mode, x, dtype=torch.float32, grad_layout=None):
    y = module(x)
    g = torch.randn_like(y) if grad_layout is None else with_layout(torch.randn(y.shape, device=y.device), grad_layout)
    y.backward(g)
    x64 = leaf64(x)
    ref = REFERENCE[mode](x64)
    ref.backward(g.double().cpu())
    assert_close(y, ref, dtype, f"{mode} output")
    assert_close(x.grad, x64.grad, dtype, f"{mode} grad")
    return y


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


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "strided_all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["relu", "stanh"])
def test_activation_layouts(layer_device, mode, layout, grad_layout):
    torch.manual_seed(12)
    x = with_layout(torch.randn(2, 3, 5, 7, device=layer_device) * 3, layout).requires_grad_()
    y = _check(nl.Activation(mode), mode, x, grad_layout=grad_layout)
    assert y.stride() == torch.relu(x.detach()).stride()


@pytest.mark.parametrize("layout", ["reversed", "strided_all"])
def test_activation_five_dims(layer_device, layout):
    # strided_all leaves five dimensions that cannot merge: more than a strided launch takes
    torch.manual_seed(13)
    x = with_layout(torch.randn(2, 3, 2, 3, 5, device=layer_device), layout).requires_grad_()
    y = _check(nl.Tanh(), "tanh", x, grad_layout="strided_all")
    assert y.stride() == torch.relu(x.detach()).stride()


@pytest.mark.parametrize("layout,ndim", [("contiguous", 0), ("reversed", 0), ("channels_last", 0), ("strided", 1),
                                         ("sliced", 2), ("strided_all", 4)])
@pytest.mark.kernels
def test_activation_kernels_read_any_layout_without_copies(layer_device, monkeypatch, layout, ndim):
    from triton_kernels import activation as k
    forward = kernel_launches(monkeypatch, k, "_activation_forward_kernel")
    backward = kernel_launches(monkeypatch, k, "_activation_backward_kernel")
    torch.manual_seed(14)
    x = with_layout(torch.randn(2, 3, 5, 7, device=layer_device), layout)
    y = k.activation_forward(x, "sigmoid")
    # one launch on x itself (no contiguous copy), flat when x is dense in any order
    ((args, kwargs),) = forward
    assert args[0] is x and args[1] is y and kwargs["NDIM"] == ndim
    assert y.stride() == torch.sigmoid(x).stride()
    g = with_layout(torch.randn(y.shape, device=layer_device), "reversed")
    dx = k.activation_backward(y, g, "sigmoid")
    ((args, kwargs),) = backward
    assert args[0] is y and args[1] is g and dx.stride() == y.stride()
    y64 = torch.sigmoid(x.double())
    assert_close(y, y64)
    assert_close(dx, g.double() * y64 * (1 - y64))


@pytest.mark.kernels
def test_activation_kernels_broadcast_input(layer_device):
    from triton_kernels import activation as k
    torch.manual_seed(16)
    x = torch.randn(5, 1, 7, device=layer_device).expand(5, 3, 7)  # elements share memory (stride 0)
    y = k.activation_forward(x, "tanh")
    assert y.stride() == torch.tanh(x).stride()
    assert_close(y, torch.tanh(x.double()))
    with pytest.raises(RuntimeError, match="single memory location"):  # as torch refuses x.relu_()
        k.activation_forward(x, "relu", out=x)


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


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "strided_all"])
def test_inplace_relu_non_contiguous(layer_device, layout):
    torch.manual_seed(15)
    base = torch.randn(2, 3, 5, 7, device=layer_device, requires_grad=True)
    x = with_layout(base * 1.0, layout)
    block = (x._base if x._base is not None else x).detach()  # all of x's memory, gaps included
    before = block.clone()
    y = nl.ReLU(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr() and y.stride() == x.stride()
    inside = torch.zeros(block.numel(), dtype=torch.bool, device=layer_device)
    inside.as_strided(x.shape, x.stride(), x.storage_offset() - block.storage_offset()).fill_(True)
    # the gaps between x's elements are untouched (compared bitwise: they were never initialised)
    gaps = ~inside.view(block.shape)
    assert torch.equal(block.view(torch.int32)[gaps], before.view(torch.int32)[gaps])
    g = with_layout(torch.randn(2, 3, 5, 7, device=layer_device), "reversed")
    y.backward(g)
    assert_close(y, torch.relu(base.double()))
    assert_close(base.grad, g.double() * (base > 0))


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
