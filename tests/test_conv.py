"""Conv2d: Triton kernels (interpreter on CPU, or a GPU) against float64 torch, forward and every gradient."""
import itertools
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

import native_layers
from native_layers import Conv2d, conv2d
from native_layers.conv import Conv2dFunction
from triton_kernels import conv as conv_kernels

# The float64 reference warns that its own 'same' padding with an even kernel copies the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def _grads_match(native_fn, ref_fn, tensors, grad_out=None, atol=2e-4, rtol=2e-4):
    """Run native_fn on `tensors` (None allowed) and ref_fn on float64 copies; compare outputs and gradients."""
    ins = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    y = native_fn(*ins)
    y_ref = ref_fn(*refs)
    assert y.shape == y_ref.shape and y.dtype == tensors[0].dtype
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    if grad_out is None:
        grad_out = torch.randn(y_ref.shape, dtype=torch.float64, device=y_ref.device)
    y.backward(grad_out.to(y.dtype))
    y_ref.backward(grad_out)
    for i, (t, r) in enumerate(zip(ins, refs)):
        if t is not None:
            torch.testing.assert_close(t.grad.double(), r.grad, atol=atol, rtol=rtol, msg=f"gradient of input {i}")


# (kernel, stride, padding, dilation, groups, bias): a sweep over what torch accepts.
SWEEP = [
    ((3, 3), 1, 0, 1, 1, True),
    ((3, 3), 1, 1, 1, 1, False),
    ((3, 3), 2, 1, 1, 1, True),
    ((3, 2), (2, 1), (1, 0), (1, 2), 1, True),
    ((1, 1), 1, 0, 1, 1, True),
    ((3, 3), 1, 2, 2, 1, True),
    ((3, 3), (1, 2), (2, 1), (2, 1), 2, True),
    ((2, 3), 3, 1, 1, 3, False),
    ((3, 3), 1, 1, 1, 6, True),  # depthwise
    ((3, 3), 1, "same", 1, 2, True),
    ((2, 2), 1, "same", (2, 1), 1, True),  # asymmetric 'same'
    ((3, 3), 2, "valid", 1, 1, True),
    ((5, 5), 1, 2, 1, 1, True),
]


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(len(SWEEP)))
def test_conv2d_sweep(layer_device, case):
    kernel, stride, padding, dilation, groups, bias = SWEEP[case]
    rng = random.Random(case)
    torch.manual_seed(case)
    h, w = rng.choice([5, 7, 9]), rng.choice([5, 7])
    cin, cout = 6, {1: 5, 2: 4, 3: 6, 6: 6}[groups]
    x = torch.randn(2, cin, h, w, device=layer_device)
    weight = torch.randn(cout, cin // groups, *kernel, device=layer_device)
    b = torch.randn(cout, device=layer_device) if bias else None
    args = (stride, padding, dilation, groups)
    _grads_match(lambda x, w, b: conv2d(x, w, b, *args), lambda x, w, b: F.conv2d(x, w, b, *args), [x, weight, b])


@pytest.mark.parametrize("cin,cout,groups,stride,padding,dilation,activation", [
    (20, 18, 1, 2, 1, 1, None),
    (34, 36, 2, 1, 2, 2, "relu"),
    (40, 4, 2, (1, 2), (1, 0), 1, None),
])
@pytest.mark.kernels
def test_conv2d_channel_blocks(layer_device, cin, cout, groups, stride, padding, dilation, activation):
    # 16 or more channels per group: the reduction runs over (kh, kw) with channel blocks inside (the sweep
    # above, with fewer channels, covers the flat reduction); partial last blocks included.
    torch.manual_seed(cin)
    x = torch.randn(2, cin, 5, 7, device=layer_device)
    weight = torch.randn(cout, cin // groups, 3, 3, device=layer_device)
    b = torch.randn(cout, device=layer_device)
    relu = F.relu if activation else (lambda t: t)
    _grads_match(lambda x, w, b: conv2d(x, w, b, stride, padding, dilation, groups, activation),
                 lambda x, w, b: relu(F.conv2d(x, w, b, stride, padding, dilation, groups)), [x, weight, b])


# (kernel, stride, padding, dilation): strides whose phases get different tap sets, some none at all (a 1x1
# kernel with stride 2; stride 2 with dilation 2, where odd rows see no tap).
STRIDED = [
    ((3, 3), 2, 1, 1),
    ((3, 3), 2, 2, 2),
    ((1, 1), 2, 0, 1),
    ((5, 3), 3, (2, 1), (2, 1)),
    ((3, 2), (2, 3), (1, 0), (1, 2)),
    ((3, 3), 4, 1, 1),
]


@pytest.mark.kernels
@pytest.mark.parametrize("case", range(len(STRIDED)))
@pytest.mark.parametrize("cin,cout,groups", [(4, 6, 1), (20, 18, 2)])
def test_conv2d_strided_input_grad(layer_device, case, cin, cout, groups):
    # The input gradient runs one stride phase (ih % stride, iw % stride) at a time over that phase's taps
    # only, a flat reduction with few channels per group or channel blocks with many. 11x11 inputs make
    # phases of different sizes, so the first phase has more tiles than the last.
    kernel, stride, padding, dilation = STRIDED[case]
    torch.manual_seed(case)
    x = torch.randn(2, cin, 11, 11, device=layer_device)
    weight = torch.randn(cout * groups, cin // groups, *kernel, device=layer_device)
    args = (stride, padding, dilation, groups)
    _grads_match(lambda x, w: conv2d(x, w, None, *args), lambda x, w: F.conv2d(x, w, None, *args), [x, weight])


@pytest.mark.kernels
@pytest.mark.parametrize("channel_major", [True, False])
def test_conv2d_store_orders(layer_device, monkeypatch, channel_major):
    # The forward and input-gradient kernels store their tiles as (channel, pixel) or (pixel, channel),
    # whichever the Triton release compiles without spills; both orders give the same answer on any release.
    monkeypatch.setattr(conv_kernels, "CHANNEL_MAJOR_STORE", channel_major)
    torch.manual_seed(7)
    for cin, cout, groups, stride in [(4, 6, 1, 2), (20, 18, 2, 1)]:
        x = torch.randn(2, cin, 9, 7, device=layer_device)[:, :, 1:, :]  # strided rows
        weight = torch.randn(cout, cin // groups, 3, 3, device=layer_device)
        b = torch.randn(cout, device=layer_device)
        args = (stride, 1, 1, groups)
        _grads_match(lambda x, w, b: conv2d(x, w, b, *args, "relu"),
                     lambda x, w, b: F.relu(F.conv2d(x, w, b, *args)), [x, weight, b])


@triton.jit
def _index_math_kernel(pix_ptr, tap_ptr, first, N, HEIGHT, WIDTH, offset, dil, stride, tap_step, KSIZE,
                       BLOCK: tl.constexpr):
    n, h, w = conv_kernels._pixels(first, BLOCK, HEIGHT, WIDTH)
    offs = tl.arange(0, BLOCK)
    tl.store(pix_ptr + offs, n)
    tl.store(pix_ptr + BLOCK + offs, h)
    tl.store(pix_ptr + 2 * BLOCK + offs, w)
    tl.store(tap_ptr, conv_kernels._first_tap(offset, dil, stride, tap_step, KSIZE))
    tl.store(tap_ptr + 1, tl.cdiv(tl.cast(N, tl.int64) * HEIGHT * WIDTH, BLOCK))


@pytest.mark.kernels
def test_conv2d_index_math(layer_device):
    # Pixel numbers past 2**31 and 2**32 (a batch of N x 1000 x 1111 outputs) decode exactly, and the tile
    # count of such a grid is not wrapped to 32 bits; the first tap of a stride phase is the first k with
    # (offset - k * dil) % stride == 0, the rest following every stride // gcd(stride, dil).
    block = 16
    height, width = 1000, 1111
    pix = torch.empty(3 * block, dtype=torch.int64, device=layer_device)
    taps = torch.empty(2, dtype=torch.int64, device=layer_device)
    for first in (2**31 - 5, 2**32 + 12345, 7 * height * width - 3):
        n = 2**32 // (height * width) + 2
        _index_math_kernel[(1,)](pix, taps, first, n, height, width, 0, 1, 1, 1, 1, BLOCK=block)
        expected = [[(first + i) // (height * width) for i in range(block)],
                    [(first + i) % (height * width) // width for i in range(block)],
                    [(first + i) % width for i in range(block)]]
        assert pix.view(3, block).tolist() == expected
        assert taps[1].item() == triton.cdiv(n * height * width, block)
    for stride, dil, ksize, offset in itertools.product([1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 5], range(7)):
        step = stride // math.gcd(stride, dil)
        _index_math_kernel[(1,)](pix, taps, 0, 1, 4, 4, offset, dil, stride, step, ksize, BLOCK=block)
        reaching = [k for k in range(ksize) if (offset - k * dil) % stride == 0]
        assert list(range(taps[0].item(), ksize, step)) == reaching, (stride, dil, ksize, offset)


@pytest.mark.kernels
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_fused_relu(layer_device, groups):
    x = torch.randn(2, 4, 7, 5, device=layer_device)
    weight = torch.randn(6, 4 // groups, 3, 3, device=layer_device)
    b = torch.randn(6, device=layer_device)
    _grads_match(lambda x, w, b: conv2d(x, w, b, 2, 1, 1, groups, activation="relu"),
                 lambda x, w, b: F.relu(F.conv2d(x, w, b, 2, 1, 1, groups)), [x, weight, b])


@pytest.mark.kernels
def test_conv2d_non_contiguous(layer_device):
    # A strided slice, a permuted weight and a channels-last input: kernels read them through their strides.
    base = torch.randn(2, 8, 9, 15, device=layer_device)
    x = base[:, ::2, 1:, ::2]
    weight = torch.randn(3, 3, 4, 5, device=layer_device).permute(3, 2, 0, 1)
    b = torch.randn(10, device=layer_device)[::2]  # 5 output channels
    grad_out = torch.randn(2, 5, 4, 4, dtype=torch.float64, device=layer_device).transpose(2, 3)
    assert not x.is_contiguous() and not weight.is_contiguous()
    _grads_match(lambda x, w, b: conv2d(x, w, b, 2, 1), lambda x, w, b: F.conv2d(x, w, b, 2, 1), [x, weight, b],
                 grad_out=grad_out)
    xl = torch.randn(2, 4, 5, 7, device=layer_device).to(memory_format=torch.channels_last)
    weight = torch.randn(3, 4, 3, 3, device=layer_device)
    _grads_match(lambda x, w: conv2d(x, w, padding=1), lambda x, w: F.conv2d(x, w, padding=1), [xl, weight])


@pytest.mark.kernels
def test_conv2d_module_drop_in(layer_device):
    torch.manual_seed(0)
    for mode in ["zeros", "reflect", "circular", "replicate"]:
        ref = nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 1), padding_mode=mode).to(layer_device)
        native = Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 1), padding_mode=mode).to(layer_device)
        assert list(native.state_dict()) == list(ref.state_dict())
        native.load_state_dict(ref.state_dict())
        x = torch.randn(2, 3, 5, 7, device=layer_device)
        torch.testing.assert_close(native(x), ref(x), atol=1e-5, rtol=1e-5)
    # Unbatched input, as torch.nn.Conv2d takes it.
    x = torch.randn(3, 5, 7, device=layer_device)
    torch.testing.assert_close(native(x), ref(x), atol=1e-5, rtol=1e-5)


def test_convert_shares_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same", bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, groups=2))
    before = [id(p) for p in model.parameters()]
    x = torch.randn(2, 1, 5, 5)
    expected = model(x)
    native_layers.convert(model)
    assert isinstance(model[0], Conv2d) and isinstance(model[2], Conv2d)
    assert [id(p) for p in model.parameters()] == before
    assert model[0].padding == "same" and model[2].groups == 2
    torch.testing.assert_close(model(x), expected)


@pytest.mark.kernels
def test_conv2d_weight_grad_deterministic(layer_device):
    # Several split-K partial sums are reduced in a fixed order: repeated runs agree to the bit.
    x = torch.randn(4, 3, 9, 7, device=layer_device)
    weight = torch.randn(5, 3, 3, 3, device=layer_device, requires_grad=True)
    b = torch.randn(5, device=layer_device, requires_grad=True)
    grads = []
    for _ in range(2):
        conv2d(x, weight, b, padding=1).square().sum().backward()
        grads.append((weight.grad.clone(), b.grad.clone()))
        weight.grad = b.grad = None
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_conv2d_cpu_path_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for padding, relu in [("same", False), ((1, 0), True)]:
        pads = ((0, 1), (1, 1)) if padding == "same" else ((1, 1), (0, 0))
        torch.autograd.gradcheck(lambda x, w, b: Conv2dFunction.apply(x, w, b, (1, 1), pads, (1, 1), 2, relu),
                                 (x, weight, b))
    torch.autograd.gradcheck(lambda x, w: conv2d(x, w, None, 2, 1, (2, 1), 2), (x, weight))


def test_conv2d_errors():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        conv2d(x, torch.randn(4, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        conv2d(x, torch.randn(4, 3, 7, 7))
    with pytest.raises(ValueError, match="strided"):
        conv2d(x, torch.randn(4, 3, 3, 3), stride=2, padding="same")
    with pytest.raises(ValueError, match="activation"):
        Conv2d(3, 4, 3, activation="tanh")


@pytest.mark.kernels
def test_conv2d_dtype_mismatch_triton(layer_device):
    with pytest.raises(TypeError, match="dtype"):
        conv2d(torch.randn(1, 2, 5, 5, device=layer_device),
               torch.randn(3, 2, 3, 3, device=layer_device, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_half_gpu(dtype, relu):
    torch.manual_seed(0)
    x = torch.randn(8, 32, 17, 15, device="cuda", dtype=dtype)
    weight = (torch.randn(48, 16, 3, 3, device="cuda") / 12).to(dtype)
    b = torch.randn(48, device="cuda", dtype=dtype)
    ref = lambda x, w, b: (F.relu if relu else (lambda t: t))(F.conv2d(x, w, b, 2, 1, 1, 2))
    tol = 3e-2 if dtype == torch.float16 else 1e-1
    _grads_match(lambda x, w, b: conv2d(x, w, b, 2, 1, 1, 2, "relu" if relu else None), ref, [x, weight, b],
                 atol=tol, rtol=tol)


@pytest.mark.gpu
def test_conv2d_fp32_gpu_resnet_shape(monkeypatch):
    # fp32 without TF32, on a ResNet-18 stage shape large enough for several tiles and split-K partials.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(4, 64, 28, 28, device="cuda")
    weight = torch.randn(128, 64, 3, 3, device="cuda") / 24
    _grads_match(lambda x, w: conv2d(x, w, None, 2, 1), lambda x, w: F.conv2d(x, w, None, 2, 1), [x, weight],
                 atol=1e-3, rtol=1e-3)


def test_conv2d_under_autocast():
    # Autocast lowers convolutions to its dtype; the native layer follows, so mixed-precision loops work.
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    native = Conv2d.from_torch(ref, activation="relu")
    x = torch.randn(2, 3, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = native(x), torch.relu(ref(x))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    assert ref.weight.grad.dtype == torch.float32
