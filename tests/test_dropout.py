"""Seed-based Dropout: kept fraction within statistical bounds, scaling, backward with the forward's mask."""
import math

import pytest
import torch

import native_layers as nl
from tests.layer_checks import LAYOUTS, assert_close, kernel_launches, with_layout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_fraction_scale_and_backward_mask(layer_device, p):
    torch.manual_seed(30)
    n = 40_000
    x = (torch.rand(n, device=layer_device) + 0.5).requires_grad_()  # never zero: a zero output means dropped
    y = nl.Dropout(p)(x)
    kept = y != 0
    frac = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    assert_close(y[kept], x[kept].double() / (1 - p))
    g = torch.randn(n, device=layer_device)
    y.backward(g)
    # The backward's mask is the forward's: gradient g/(1-p) exactly where the output was kept, 0 elsewhere.
    assert_close(x.grad, torch.where(kept, g.double() / (1 - p), 0.0))


def test_dropout_masks_differ_per_call_and_repeat_per_seed(layer_device):
    x = torch.rand(4, 1001, device=layer_device) + 0.5
    torch.manual_seed(31)
    a = nl.dropout(x, 0.5)
    b = nl.dropout(x, 0.5)
    assert not torch.equal(a != 0, b != 0)
    torch.manual_seed(31)
    assert torch.equal(nl.dropout(x, 0.5), a)
    assert torch.equal(nl.dropout(x, 0.5, seed=7), nl.dropout(x, 0.5, seed=7))
    # rows are not copies of each other (the random stream runs over the whole tensor)
    assert not torch.equal(a[0] != 0, a[1] != 0)


def test_dropout_eval_identity_and_edge_probabilities(layer_device):
    x = torch.randn(3, 5, device=layer_device, requires_grad=True)
    layer = nl.Dropout(0.5).eval()
    assert layer(x) is x
    assert torch.equal(nl.Dropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(nl.Dropout(0.0)(x), x)
    with pytest.raises(ValueError, match="probability"):
        nl.dropout(x, 1.5)
    empty = torch.randn(0, 4, device=layer_device, requires_grad=True)
    nl.dropout(empty, 0.3).sum().backward()
    assert empty.grad.shape == (0, 4)


def test_dropout_non_contiguous_and_inplace(layer_device):
    torch.manual_seed(32)
    base = torch.rand(30, 41, device=layer_device) + 0.5
    x = base.t()[::2].requires_grad_()
    y = nl.dropout(x, 0.4, seed=3)
    assert y.shape == x.shape
    assert_close(y[y != 0], x[y != 0].double() / 0.6)
    z = x.detach().clone()
    out = nl.dropout(z, 0.4, seed=3, inplace=True)
    assert out.data_ptr() == z.data_ptr() and torch.equal(out, y.detach())
    assert isinstance(nl.Dropout(), torch.nn.Dropout)


@pytest.mark.parametrize("grad_layout", ["contiguous", "reversed", "strided_all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dropout_backward_mask_is_forward_mask_across_layouts(layer_device, layout, grad_layout):
    torch.manual_seed(35)
    x = with_layout(torch.rand(2, 3, 5, 7, device=layer_device) + 0.5, layout).requires_grad_()
    y = nl.dropout(x, 0.4, seed=5)
    assert y.stride() == torch.relu(x.detach()).stride()
    kept = y != 0
    assert 0 < kept.sum() < kept.numel()
    assert_close(y[kept], x[kept].double() / 0.6)
    g = with_layout(torch.randn(2, 3, 5, 7, device=layer_device), grad_layout)
    y.backward(g)
    assert_close(x.grad, torch.where(kept, g.double() / 0.6, 0.0))


@pytest.mark.parametrize("layout", ["reversed", "strided_all"])
def test_dropout_five_dims(layer_device, layout):
    torch.manual_seed(36)
    x = with_layout(torch.rand(2, 3, 2, 3, 5, device=layer_device) + 0.5, layout).requires_grad_()
    y = nl.dropout(x, 0.5, seed=6)
    kept = y != 0
    assert 0 < kept.sum() < kept.numel() and y.stride() == torch.relu(x.detach()).stride()
    assert_close(y[kept], x[kept].double() / 0.5)
    g = with_layout(torch.randn(y.shape, device=layer_device), "strided_all")
    y.backward(g)
    assert_close(x.grad, torch.where(kept, g.double() / 0.5, 0.0))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "strided_all"])
def test_dropout_inplace_non_contiguous(layer_device, layout):
    torch.manual_seed(37)
    base = (torch.rand(2, 3, 5, 7, device=layer_device) + 0.5).requires_grad_()
    expected = nl.dropout(with_layout(base.detach(), layout), 0.3, seed=9)
    x = with_layout(base * 1.0, layout)
    block = (x._base if x._base is not None else x).detach()  # all of x's memory, gaps included
    before = block.clone()
    y = nl.dropout(x, 0.3, seed=9, inplace=True)
    assert y.data_ptr() == x.data_ptr() and y.stride() == x.stride()
    assert torch.equal(y.detach(), expected)  # the same mask as out of place: the same memory order
    inside = torch.zeros(block.numel(), dtype=torch.bool, device=layer_device)
    inside.as_strided(x.shape, x.stride(), x.storage_offset() - block.storage_offset()).fill_(True)
    gaps = ~inside.view(block.shape)  # untouched between x's elements (compared bitwise: never initialised)
    assert torch.equal(block.view(torch.int32)[gaps], before.view(torch.int32)[gaps])
    g = with_layout(torch.randn(2, 3, 5, 7, device=layer_device), "reversed")
    y.backward(g)
    assert_close(base.grad, torch.where(expected != 0, g.double() / 0.7, 0.0))


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["reversed", "channels_last", "sliced"])
def test_dropout_kernel_reads_any_layout_without_copies(layer_device, monkeypatch, layout):
    from triton_kernels import dropout as k
    launches = kernel_launches(monkeypatch, k, "_dropout_kernel")
    x = with_layout(torch.rand(2, 3, 5, 7, device=layer_device) + 0.5, layout)
    y = k.dropout(x, 0.5, seed=4)
    ((args, _),) = launches
    assert args[0] is x and args[1] is y and y.stride() == torch.relu(x).stride()
    # Random number k goes to the k-th element in memory, whatever the order of dimensions: the mask is the
    # flat kernel's on x's storage.
    if layout != "sliced":
        def in_memory_order(t):
            return t.permute(*sorted(range(t.dim()), key=lambda d: -t.stride(d))).reshape(-1)
        assert torch.equal(in_memory_order(y), k.dropout(in_memory_order(x), 0.5, seed=4))


def test_dropout_cpu_path_gradcheck(monkeypatch):
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nl.dropout(x, 0.3, seed=11), (x,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_gpu_dtypes(dtype):
    torch.manual_seed(33)
    x = (torch.rand(1000, 1000, device="cuda") + 0.5).to(dtype).requires_grad_()
    y = nl.dropout(x, 0.25)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 5 * math.sqrt(0.25 * 0.75 / 1e6)
    assert_close(y[kept], x[kept].double() / 0.75, dtype)
    y.backward(torch.ones_like(y))
    assert_close(x.grad, kept.double() / 0.75, dtype)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_half_precision_kernels(layer_device, dtype):
    torch.manual_seed(34)
    x = (torch.rand(4, 2000, device=layer_device) + 0.5).to(dtype).requires_grad_()
    y = nl.dropout(x, 0.3)
    kept = y != 0
    assert y.dtype == dtype and abs(kept.float().mean().item() - 0.7) < 5 * (0.3 * 0.7 / 8000) ** 0.5
    assert_close(y[kept], x[kept].double() / 0.7, dtype)
    y.backward(torch.ones_like(y))
    assert_close(x.grad, kept.double() / 0.7, dtype)
