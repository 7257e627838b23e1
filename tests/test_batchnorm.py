"""BatchNorm1d/2d against torch's layers computed in float64: outputs, gradients, running statistics."""
import copy

import pytest
import torch
import torch.nn as nn

import native_layers as nl
from tests.layer_checks import assert_close, leaf64


def _compare(native_cls, torch_cls, x, steps=2, dtype=torch.float32, **kwargs):
    """Train-mode steps then an eval step; outputs, all gradients and buffers against torch in float64."""
    torch.manual_seed(40)
    ref = torch_cls(x.shape[1], **kwargs).double()
    if ref.affine:
        with torch.no_grad():  # not the default 1/0, so that the affine part is exercised
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    native = native_cls(x.shape[1], **kwargs).to(device=x.device, dtype=x.dtype)
    native.load_state_dict(ref.state_dict())
    for step in range(steps + 1):
        if step == steps:
            ref.eval()
            native.eval()
        xi = (x * (step + 1) + step).detach().requires_grad_()
        y = native(xi)
        g = torch.randn_like(y)
        y.backward(g)
        x64 = leaf64(xi)
        ref_y = ref(x64)
        ref_y.backward(g.double().cpu())
        assert_close(y, ref_y, dtype, f"step {step} output")
        assert_close(xi.grad, x64.grad, dtype, f"step {step} grad input")
        if ref.affine:
            assert_close(native.weight.grad, ref.weight.grad, dtype, f"step {step} grad weight")
            assert_close(native.bias.grad, ref.bias.grad, dtype, f"step {step} grad bias")
            native.zero_grad()
            ref.zero_grad()
        for name, buf in ref.named_buffers():
            assert_close(dict(native.named_buffers())[name], buf, dtype, name)


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}])
def test_batchnorm1d(layer_device, kwargs):
    torch.manual_seed(41)
    x = torch.randn(37, 45, device=layer_device) * 2 + 1
    _compare(nl.BatchNorm1d, nn.BatchNorm1d, x, **kwargs)


def test_batchnorm1d_sequence_input_and_non_contiguous(layer_device):
    torch.manual_seed(42)
    x = torch.randn(5, 9, 13, device=layer_device)  # (N, C, L)
    _compare(nl.BatchNorm1d, nn.BatchNorm1d, x)
    xt = torch.randn(70, 6, device=layer_device).t()[:, ::2].t()  # (35, 6), strided
    assert not xt.is_contiguous()
    _compare(nl.BatchNorm1d, nn.BatchNorm1d, xt, momentum=0.3)


def test_batchnorm2d(layer_device):
    torch.manual_seed(43)
    x = torch.randn(3, 5, 7, 9, device=layer_device).permute(0, 1, 3, 2)  # (N, C, W, H), non-contiguous
    _compare(nl.BatchNorm2d, nn.BatchNorm2d, x, eps=1e-3)


def test_batchnorm_many_rows_split_across_programs(layer_device):
    # More rows than one program reduces (several partial results combined): a large mean, small variance.
    torch.manual_seed(44)
    x = torch.randn(600, 3, device=layer_device) * 0.1 + 50
    _compare(nl.BatchNorm1d, nn.BatchNorm1d, x, steps=1)


def test_batchnorm2d_large_mean_small_spread_channels_last(layer_device):
    # Far off-centre channels (the CPU path shifts them before torch's batch norm), a cumulative average of the
    # running statistics (momentum=None: factors 1 then 1/2) and a channels-last input.
    torch.manual_seed(48)
    x = (torch.randn(4, 3, 6, 5, device=layer_device) * 0.1 + 50).contiguous(memory_format=torch.channels_last)
    _compare(nl.BatchNorm2d, nn.BatchNorm2d, x, momentum=None)


def test_batchnorm_edge_cases(layer_device):
    bn = nl.BatchNorm1d(4).to(layer_device)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4, device=layer_device))
    with pytest.raises(ValueError):
        bn(torch.randn(2, 4, 3, 3, device=layer_device))  # torch's own dimension check
    x = torch.randn(0, 4, device=layer_device, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.shape == (0, 4) and torch.equal(bn.running_mean, torch.zeros(4, device=layer_device))
    # as in torch: the rejected batch of one was counted too, the empty one left the statistics alone
    assert int(bn.num_batches_tracked) == 2 and torch.equal(bn.weight.grad, torch.zeros(4, device=layer_device))
    # evaluation with a single sample is fine (running statistics)
    bn.eval()
    assert bn(torch.randn(1, 4, device=layer_device)).shape == (1, 4)


def test_batchnorm_state_dict_and_convert():
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    keys = list(ref.state_dict())
    native = nl.convert(copy.deepcopy(ref))
    assert isinstance(native[1], nl.BatchNorm1d) and isinstance(native[1], nn.BatchNorm1d)
    assert list(native.state_dict()) == keys
    x = torch.randn(8, 3)
    torch.testing.assert_close(native(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native[1].running_var, ref[1].running_var)
    ref.load_state_dict(native.state_dict())
    assert isinstance(nl.convert(nn.BatchNorm2d(3)), nl.BatchNorm2d)


def test_batchnorm_cpu_path_gradcheck(monkeypatch):
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    torch.manual_seed(45)
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: nl.batch_norm(x, None, None, w, b, training=True), (x, w, b))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: nl.batch_norm(x, rm, rv, w, b, training=False), (x, w, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_gpu_dtypes(dtype):
    torch.manual_seed(46)
    x = (torch.randn(256, 300, device="cuda") + 3).to(dtype)
    bn = nl.BatchNorm1d(300).cuda()
    ref = nn.BatchNorm1d(300).double()
    xi = x.requires_grad_()
    y = bn(xi)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = leaf64(xi)
    ref_y = ref(x64)
    ref_y.backward(g.double().cpu())
    assert_close(y, ref_y, dtype)
    assert_close(xi.grad, x64.grad, dtype)
    assert_close(bn.running_var, ref.running_var, torch.float32)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_half_precision_kernels(layer_device, dtype):
    """Half-precision input with float32 parameters and statistics, as under autocast."""
    torch.manual_seed(47)
    for cls, ref_cls, shape in [(nl.BatchNorm1d, nn.BatchNorm1d, (33, 20)),
                                (nl.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 7))]:
        x = (torch.randn(shape, device=layer_device) + 2).to(dtype).requires_grad_()
        bn = cls(shape[1]).to(layer_device)
        ref = ref_cls(shape[1]).double()
        y = bn(x)
        g = torch.randn_like(y)
        y.backward(g)
        x64 = leaf64(x)
        ref_y = ref(x64)
        ref_y.backward(g.double().cpu())
        assert y.dtype == dtype
        assert_close(y, ref_y, dtype)
        assert_close(x.grad, x64.grad, dtype)
        assert_close(bn.weight.grad, ref.weight.grad, dtype)
        assert_close(bn.running_var, ref.running_var, torch.float32)
