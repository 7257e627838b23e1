"""LRN: fused Triton kernels (interpreter on CPU, or a GPU) and the CPU path against float64 torch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import native_layers
from tests.layer_checks import assert_grads_match
from native_layers import LRN, local_response_norm
from native_layers.lrn import LRNFunction


# (size, alpha, beta, k): AlexNet's and cuda-convnet's settings, even sizes, a window wider than C, and a
# large alpha so the cross-channel term of the gradient matters.
PARAMS = [(5, 1e-4, 0.75, 2.0), (3, 5e-5, 0.75, 1.0), (4, 0.5, 0.75, 1.0), (2, 1.0, 0.5, 1.5), (1, 0.3, 1.2, 1.0),
          (9, 2.0, 0.75, 1.0)]


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(len(PARAMS)))
def test_lrn_matches_torch(layer_device, case):
    torch.manual_seed(case)
    size, alpha, beta, k = PARAMS[case]
    x = 2 * torch.randn(2, 7, 5, 3 + case % 2, device=layer_device)
    for fn in [lambda x: local_response_norm(x, size, alpha, beta, k), LRN(size, alpha, beta, k)]:
        assert_grads_match(fn, lambda x: F.local_response_norm(x, size, alpha, beta, k), x)


@pytest.mark.kernels
@pytest.mark.parametrize("shape", [(2, 6, 9), (2, 5, 3, 2, 3), (1, 17, 3, 3)])
def test_lrn_other_ranks(layer_device, shape):
    x = torch.randn(shape, device=layer_device)
    assert_grads_match(lambda x: local_response_norm(x, 5, 0.5, 0.75, 1.0),
                 lambda x: F.local_response_norm(x, 5, 0.5, 0.75, 1.0), x)


@pytest.mark.kernels
def test_lrn_non_contiguous(layer_device):
    x = torch.randn(2, 5, 12, 10, device=layer_device)[:, :, ::2, 1:].transpose(2, 3)
    grad_out = torch.randn(2, 6, 9, 5, dtype=torch.float64, device=layer_device).transpose(1, 3)
    assert not x.is_contiguous() and not grad_out.is_contiguous()
    assert_grads_match(lambda x: local_response_norm(x, 3, 0.5, 0.75, 1.0),
                 lambda x: F.local_response_norm(x, 3, 0.5, 0.75, 1.0), x, grad_out)
    xl = torch.randn(2, 6, 3, 5, device=layer_device).to(memory_format=torch.channels_last)
    assert_grads_match(lambda x: local_response_norm(x, 3, 0.5, 0.75, 1.0),
                 lambda x: F.local_response_norm(x, 3, 0.5, 0.75, 1.0), xl)
    # Every other channel: each plane is one dense run, read as such, between gaps.
    xc = torch.randn(2, 10, 4, 6, device=layer_device)[:, ::2]
    grad_c = torch.randn(3, 5, 4, 6, dtype=torch.float64, device=layer_device)[1:]
    assert_grads_match(lambda x: local_response_norm(x, 3, 0.5, 0.75, 1.0),
                 lambda x: F.local_response_norm(x, 3, 0.5, 0.75, 1.0), xc, grad_c)


def test_lrn_cpu_path_gradcheck():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    for size in (1, 4, 5):
        torch.autograd.gradcheck(lambda x: LRNFunction.apply(x, size, 0.7, 0.75, 1.0), (x,))


def test_lrn_drop_in_and_convert():
    ref = nn.LocalResponseNorm(5, 1e-3, 0.75, 2.0)
    native = LRN(5, 1e-3, 0.75, 2.0)
    assert isinstance(native, nn.LocalResponseNorm) and repr(native) == repr(ref).replace("LocalResponseNorm", "LRN")
    model = nn.Sequential(nn.Identity(), ref)
    native_layers.convert(model)
    lrn = model[1]
    assert isinstance(lrn, LRN) and (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-3, 0.75, 2.0)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(model(x), F.local_response_norm(x, 5, 1e-3, 0.75, 2.0))


def test_lrn_errors():
    with pytest.raises(ValueError, match="3 or more"):
        local_response_norm(torch.randn(4, 5), 3)
    with pytest.raises(ValueError, match="size"):
        local_response_norm(torch.randn(1, 4, 5), 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lrn_gpu_dtypes(dtype):
    x = torch.randn(8, 64, 27, 25, device="cuda", dtype=dtype)
    tol = 3e-5 if dtype == torch.float32 else 2e-2  # GPU exp/log are approximate to a few ulp
    assert_grads_match(lambda x: local_response_norm(x, 5, 1e-2, 0.75, 1.0),
                 lambda x: F.local_response_norm(x, 5, 1e-2, 0.75, 1.0), x, atol=tol, rtol=tol)
