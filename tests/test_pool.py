"""MaxPool2d and AvgPool2d: Triton kernels (interpreter on CPU, or a GPU) against float64 torch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import native_layers
from tests.layer_checks import assert_grads_match
from native_layers import AvgPool2d, MaxPool2d, avg_pool2d, max_pool2d
from native_layers.pool import AvgPool2dFunction, MaxPool2dFunction


# (kernel_size, stride, padding, dilation, ceil_mode) that torch accepts
MAX_SWEEP = [
    (2, None, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    ((3, 2), (2, 1), (1, 1), (1, 2), True),
    (2, 3, 1, 2, True),
    ((1, 3), 1, (0, 1), 1, False),
    (3, 1, 0, (2, 1), False),
]

# (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_SWEEP = [
    (2, None, 0, False, True, None),
    (3, 2, 1, False, True, None),
    (3, 2, 1, True, False, None),
    ((3, 2), (2, 1), (1, 1), True, True, None),
    ((2, 4), 3, (1, 2), True, False, None),
    (3, 2, 1, True, False, 5),
    (3, 1, 0, False, True, 2),
]


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(len(MAX_SWEEP)))
def test_max_pool2d_sweep(layer_device, case):
    torch.manual_seed(case)
    kernel, stride, padding, dilation, ceil_mode = MAX_SWEEP[case]
    x = torch.randn(2, 3, 7 + case % 3, 5 + 2 * (case % 2), device=layer_device)
    args = (kernel, stride, padding, dilation, ceil_mode)
    assert_grads_match(lambda x: max_pool2d(x, *args), lambda x: F.max_pool2d(x, *args), x)
    y, idx = max_pool2d(x, *args, return_indices=True)
    torch.testing.assert_close(idx, F.max_pool2d(x, *args, return_indices=True)[1])


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(len(AVG_SWEEP)))
def test_avg_pool2d_sweep(layer_device, case):
    torch.manual_seed(case)
    args = AVG_SWEEP[case]
    x = torch.randn(2, 3, 5 + 2 * (case % 3), 7 - 2 * (case % 2), device=layer_device)
    assert_grads_match(lambda x: avg_pool2d(x, *args), lambda x: F.avg_pool2d(x, *args), x)


@pytest.mark.kernels
def test_max_pool2d_ties_and_infinities(layer_device):
    # Ties pick the first maximum in window order, and gradients follow it, as in torch; -inf is a value.
    x = torch.randint(0, 3, (2, 2, 7, 5), device=layer_device).float()
    x[0, 0, :3, :3] = float("-inf")
    args = (3, 2, 1, 1, True)
    y, idx = max_pool2d(x, *args, return_indices=True)
    y_ref, idx_ref = F.max_pool2d(x, *args, return_indices=True)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(idx, idx_ref)
    assert_grads_match(lambda x: max_pool2d(x, *args), lambda x: F.max_pool2d(x, *args), x)


@pytest.mark.kernels
def test_pool_non_contiguous(layer_device):
    base = torch.randn(3, 8, 11, 9, device=layer_device)
    x = base[1:, ::2, 1:, :].transpose(2, 3)
    assert not x.is_contiguous()
    grad_out = torch.randn(2, 4, 5, 7, dtype=torch.float64, device=layer_device)[..., :5].transpose(2, 3)
    assert_grads_match(lambda x: max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1), x, grad_out)
    assert_grads_match(lambda x: avg_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1), x, grad_out)
    xl = torch.randn(2, 4, 7, 5, device=layer_device).to(memory_format=torch.channels_last)
    assert_grads_match(lambda x: max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2), xl)


@pytest.mark.kernels
def test_pool_modules_drop_in(layer_device):
    x = torch.randn(2, 3, 7, 6, device=layer_device)
    pairs = [(MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
             (MaxPool2d(2, return_indices=True), nn.MaxPool2d(2, return_indices=True)),
             (AvgPool2d(3, 2, 1, True, False), nn.AvgPool2d(3, 2, 1, True, False)),
             (AvgPool2d(2, divisor_override=3), nn.AvgPool2d(2, divisor_override=3))]
    for native, ref in pairs:
        assert native.state_dict().keys() == ref.state_dict().keys() and repr(native) == repr(ref)
        out, expected = native(x), ref(x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(native(x[0]), ref(x[0]))  # unbatched (C, H, W)


def test_convert_pools():
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1, dilation=2), nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False))
    x = torch.randn(1, 2, 9, 9)
    expected = model(x)
    native_layers.convert(model)
    assert isinstance(model[0], MaxPool2d) and isinstance(model[1], AvgPool2d)
    assert model[0].dilation == 2 and model[1].count_include_pad is False
    torch.testing.assert_close(model(x), expected)


def test_pool_cpu_path_gradcheck():
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: MaxPool2dFunction.apply(x, (3, 2), (2, 1), (1, 1), (1, 2), True, (4, 6))[0],
                             (x,))
    torch.autograd.gradcheck(lambda x: AvgPool2dFunction.apply(x, (3, 2), (2, 2), (1, 1), True, False, None, (4, 4)),
                             (x,))
    torch.autograd.gradcheck(lambda x: avg_pool2d(x, 3, 1, 1, divisor_override=4), (x,))


def test_pool_errors():
    x = torch.randn(1, 1, 5, 5)
    with pytest.raises(ValueError, match="half of the kernel"):
        max_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="too small"):
        avg_pool2d(x, 7)
    with pytest.raises(ValueError, match="divisor_override"):
        avg_pool2d(x, 2, divisor_override=0)
    with pytest.raises(ValueError, match="4-D"):
        max_pool2d(torch.randn(5, 5), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_half_gpu(dtype):
    x = torch.randn(16, 64, 31, 29, device="cuda", dtype=dtype)
    for native, ref in [(lambda x: max_pool2d(x, 3, 2, 1, ceil_mode=True),
                         lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
                        (lambda x: avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                         lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))]:
        assert_grads_match(native, ref, x, atol=1e-2, rtol=1e-2)
