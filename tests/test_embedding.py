"""Embedding against torch in float64: lookups, padding_idx, scale_grad_by_freq, determinism, sparse."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import native_layers as nl
from tests.layer_checks import assert_close, leaf64


def _check(idx, weight, dtype=torch.float32, **kwargs):
    out = nl.embedding(idx, weight, **kwargs)
    g = torch.randn_like(out)
    out.backward(g)
    w64 = leaf64(weight)
    ref = F.embedding(idx.cpu(), w64, **kwargs)
    ref.backward(g.double().cpu())
    assert_close(out, ref, dtype, "lookup")
    assert_close(weight.grad, w64.grad, dtype, "grad weight")


@pytest.mark.parametrize("width", [131, 1100])  # odd; the second needs two column blocks both ways
@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 3}, {"padding_idx": -2, "scale_grad_by_freq": True}])
def test_embedding_matches_reference(layer_device, kwargs, width):
    torch.manual_seed(50)
    weight = torch.randn(11, width, device=layer_device, requires_grad=True)
    idx = torch.randint(0, 11, (7, 5), device=layer_device)  # repeats: rows summed in the backward
    idx[0, :3] = 3
    idx[1, 1] = 9
    _check(idx, weight, **kwargs)


def test_embedding_non_contiguous_weight_single_and_empty(layer_device):
    torch.manual_seed(51)
    weight = torch.randn(6, 9, device=layer_device).t().requires_grad_()  # (9, 6), column-major
    _check(torch.tensor([4], device=layer_device), weight)
    weight.grad = None
    _check(torch.tensor([[2, 2], [0, 8]], dtype=torch.int32, device=layer_device), weight)
    weight.grad = None
    out = nl.embedding(torch.zeros(0, 3, dtype=torch.long, device=layer_device), weight)
    assert out.shape == (0, 3, 6)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_embedding_backward_is_deterministic(layer_device):
    torch.manual_seed(52)
    weight = torch.randn(5, 64, device=layer_device, requires_grad=True)
    idx = torch.randint(0, 5, (120,), device=layer_device)
    g = torch.randn(120, 64, device=layer_device) * 1e3  # large values: addition order would show
    grads = []
    for _ in range(2):
        weight.grad = None
        nl.embedding(idx, weight).backward(g)
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_embedding_module_convert_sparse_max_norm_and_errors():
    torch.manual_seed(53)
    ref = nn.Embedding(10, 4, padding_idx=0)
    native = nl.convert(nn.Sequential(ref))[0]
    assert isinstance(native, nl.Embedding) and native.weight is ref.weight and native.padding_idx == 0
    assert list(native.state_dict()) == ["weight"]
    idx = torch.tensor([[0, 2, 2, 9]])
    sparse = nl.Embedding(10, 4, sparse=True, padding_idx=2)
    sparse_ref = nn.Embedding(10, 4, sparse=True, padding_idx=2)
    sparse_ref.load_state_dict(sparse.state_dict())
    sparse(idx).sum().backward()
    sparse_ref(idx).sum().backward()
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), sparse_ref.weight.grad.to_dense())
    capped = nl.Embedding(10, 4, max_norm=0.5)
    capped_ref = nn.Embedding(10, 4, max_norm=0.5)
    capped_ref.load_state_dict(capped.state_dict())
    torch.testing.assert_close(capped(idx), capped_ref(idx))
    torch.testing.assert_close(capped.weight, capped_ref.weight)
    with pytest.raises(IndexError, match="out of range"):
        native(torch.tensor([10]))
    with pytest.raises(TypeError, match="int64"):
        native(torch.tensor([1.0]))


def test_embedding_cpu_path_gradcheck(monkeypatch):
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 5, 1], [0, 5, 2]])
    assert torch.autograd.gradcheck(lambda w: nl.embedding(idx, w), (w,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedding_gpu_dtypes(dtype):
    torch.manual_seed(54)
    weight = torch.randn(1000, 257, device="cuda").to(dtype).requires_grad_()
    idx = torch.randint(0, 1000, (64, 33), device="cuda")
    _check(idx, weight, dtype, padding_idx=7)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedding_half_precision_kernels(layer_device, dtype):
    torch.manual_seed(55)
    weight = torch.randn(13, 40, device=layer_device).to(dtype).requires_grad_()
    idx = torch.randint(0, 13, (6, 7), device=layer_device)
    _check(idx, weight, dtype, padding_idx=2)
