"""SoftmaxCrossEntropy (nn.CrossEntropyLoss's contract), Softmax and EuclideanLoss against float64 torch."""
import pytest
import torch
import torch.nn.functional as F

import native_layers as nl
from tests.layer_checks import assert_close, leaf64


def _check_ce(x, target, dtype=torch.float32, **kwargs):
    out = nl.softmax_cross_entropy(x, target, **kwargs)
    g = torch.rand_like(out) + 0.5
    out.backward(g)
    x64 = leaf64(x)
    kw = dict(kwargs)
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"].double().cpu()
    t64 = target.double().cpu() if target.is_floating_point() else target.cpu()
    ref = F.cross_entropy(x64, t64, **kw)
    ref.backward(g.double().cpu())
    assert_close(out, ref, dtype, "loss")
    assert_close(x.grad, x64.grad, dtype, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_class_targets(layer_device, reduction, smoothing, weighted):
    torch.manual_seed(11)
    rows, classes = 23, 37
    x = (torch.randn(rows, classes + 4, device=layer_device) * 3)[:, 2:-2].requires_grad_()  # non-contiguous
    target = torch.randint(0, classes, (rows,), device=layer_device)
    target[::5] = -100  # ignored rows
    weight = torch.rand(classes, device=layer_device) + 0.5 if weighted else None
    _check_ce(x, target, reduction=reduction, label_smoothing=smoothing, weight=weight)


@pytest.mark.parametrize("classes", [1, 5000])  # one class; a row longer than one block (several passes)
def test_cross_entropy_row_lengths(layer_device, classes):
    torch.manual_seed(classes)
    x = torch.randn(3, classes, device=layer_device, requires_grad=True)
    target = torch.randint(0, classes, (3,), device=layer_device)
    _check_ce(x, target, label_smoothing=0.1)


def test_cross_entropy_custom_ignore_index_and_spatial_input(layer_device):
    torch.manual_seed(12)
    x = torch.randn(2, 7, 3, 5, device=layer_device, requires_grad=True)  # (N, C, d1, d2)
    target = torch.randint(0, 7, (2, 3, 5), device=layer_device)
    target[0, 1] = 3
    _check_ce(x, target, ignore_index=3, reduction="none")


def test_cross_entropy_probability_targets(layer_device):
    torch.manual_seed(13)
    x = torch.randn(9, 11, device=layer_device, requires_grad=True)
    target = torch.softmax(torch.randn(9, 11, device=layer_device), 1)
    _check_ce(x, target, label_smoothing=0.2, weight=torch.rand(11, device=layer_device) + 0.5)


def test_cross_entropy_single_sample_and_empty_batch(layer_device):
    torch.manual_seed(14)
    x = torch.randn(6, device=layer_device, requires_grad=True)
    _check_ce(x, torch.tensor(4, device=layer_device))
    empty = torch.randn(0, 6, device=layer_device, requires_grad=True)
    out = nl.softmax_cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=layer_device), reduction="sum")
    out.backward()
    assert out.item() == 0 and empty.grad.shape == (0, 6)
    # A batch where every row is ignored has no mean: nan, as in torch.
    all_ignored = torch.full((3,), -100, device=layer_device)
    assert torch.isnan(nl.softmax_cross_entropy(torch.randn(3, 6, device=layer_device), all_ignored))


def test_cross_entropy_errors():
    x = torch.randn(4, 5)
    with pytest.raises(IndexError, match="out of bounds"):
        nl.softmax_cross_entropy(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="does not match"):
        nl.softmax_cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        nl.SoftmaxCrossEntropy(reduction="avg")(x, torch.tensor([0, 1, 2, 3]))


def test_module_is_a_drop_in_cross_entropy_loss():
    loss = nl.SoftmaxCrossEntropy(label_smoothing=0.1, ignore_index=0)
    assert isinstance(loss, torch.nn.CrossEntropyLoss)
    x, t = torch.randn(8, 4), torch.randint(0, 4, (8,))
    torch.testing.assert_close(loss(x, t), torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0)(x, t))


@pytest.mark.parametrize("probabilities", [False, True])
def test_cross_entropy_cpu_path_gradcheck(probabilities, monkeypatch):
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    torch.manual_seed(15)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    if probabilities:
        t = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1).requires_grad_()
        fn = lambda x, t: nl.softmax_cross_entropy(x, t, label_smoothing=0.2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, t))
    else:
        t = torch.tensor([0, 3, -100, 1, 2])
        w = torch.rand(4, dtype=torch.float64) + 0.5
        fn = lambda x: nl.softmax_cross_entropy(x, t, w, label_smoothing=0.2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_gpu_dtypes(dtype):
    torch.manual_seed(16)
    x = (torch.randn(64, 3001, device="cuda") * 2).to(dtype).requires_grad_()
    target = torch.randint(0, 3001, (64,), device="cuda")
    _check_ce(x, target, dtype, label_smoothing=0.1, reduction="sum")


@pytest.mark.parametrize("shape,dim", [((7, 37), 1), ((3, 5000), -1), ((4, 6, 5), 1), ((1,), 0), ((0, 9), 1)])
def test_softmax_matches_reference(layer_device, shape, dim):
    torch.manual_seed(17)
    x = (torch.randn(shape, device=layer_device) * 4).requires_grad_()
    y = nl.Softmax(dim)(x)
    g = torch.randn_like(y)
    y.backward(g)
    x64 = leaf64(x)
    ref = torch.softmax(x64, dim)
    ref.backward(g.double().cpu())
    assert_close(y, ref, what="softmax")
    assert_close(x.grad, x64.grad, what="softmax grad")


def test_softmax_non_contiguous_and_module(layer_device):
    torch.manual_seed(18)
    x = torch.randn(30, 21, device=layer_device).t()[:, ::3].requires_grad_()  # (21, 10), column stride 3
    y = nl.softmax(x, 1)
    y.backward(torch.ones_like(y) * torch.arange(10.0, device=layer_device))
    x64 = leaf64(x)
    torch.softmax(x64, 1).backward(torch.ones(21, 10, dtype=torch.float64) * torch.arange(10.0).double())
    assert_close(y, torch.softmax(x64, 1))
    assert_close(x.grad, x64.grad)
    assert isinstance(nl.Softmax(1), torch.nn.Softmax)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_euclidean_loss(layer_device, reduction):
    torch.manual_seed(19)
    x = torch.randn(9, 3, 47, device=layer_device).transpose(1, 2).requires_grad_()  # non-contiguous
    t = torch.randn(9, 47, 3, device=layer_device, requires_grad=True)
    out = nl.EuclideanLoss(reduction)(x, t)
    g = torch.rand_like(out) + 0.5
    out.backward(g)
    x64, t64 = leaf64(x), leaf64(t)
    rows = 0.5 * ((x64 - t64) ** 2).flatten(1).sum(1)
    ref = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    ref.backward(g.double().cpu())
    assert_close(out, ref, what="loss")
    assert_close(x.grad, x64.grad, what="grad input")
    assert_close(t.grad, t64.grad, what="grad target")


def test_euclidean_loss_edge_cases_and_gradcheck(monkeypatch):
    one = nl.euclidean_loss(torch.tensor([[3.0]]), torch.tensor([[1.0]]))
    assert one.item() == 2.0
    assert torch.isnan(nl.euclidean_loss(torch.zeros(0, 4), torch.zeros(0, 4)))  # mean of nothing
    with pytest.raises(ValueError, match="differ"):
        nl.euclidean_loss(torch.zeros(2, 4), torch.zeros(2, 3))
    monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: nl.euclidean_loss(x, t), (x, t))
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: nl.softmax(s, 1), (s,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_gpu_dtypes(dtype):
    torch.manual_seed(20)
    x = (torch.randn(33, 7000, device="cuda") * 3).to(dtype).requires_grad_()
    y = nl.softmax(x, 1)
    y.backward(torch.randn_like(y))
    x64 = leaf64(x)
    assert_close(y, torch.softmax(x64, 1), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_euclidean_loss_gpu_dtypes(dtype):
    torch.manual_seed(21)
    x = torch.randn(64, 1000, device="cuda").to(dtype).requires_grad_()
    t = torch.randn(64, 1000, device="cuda").to(dtype)
    out = nl.euclidean_loss(x, t)
    out.backward()
    x64 = leaf64(x)
    ref = 0.5 * ((x64 - t.double().cpu()) ** 2).sum(1).mean()
    ref.backward()
    assert_close(out, ref, dtype)
    assert_close(x.grad, x64.grad, dtype)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_and_losses_half_precision_kernels(layer_device, dtype):
    torch.manual_seed(22)
    x = (torch.randn(9, 301, device=layer_device) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, 301, (9,), device=layer_device)
    _check_ce(x, target, dtype, label_smoothing=0.1)
    x.grad = None
    y = nl.softmax(x, 1)
    y.backward(torch.ones_like(y) * torch.linspace(-1, 1, 301, device=layer_device).to(dtype))
    x64 = leaf64(x)
    ref = torch.softmax(x64, 1)
    ref.backward(torch.ones(9, 301, dtype=torch.float64) * torch.linspace(-1, 1, 301).to(dtype).double())
    assert_close(y, ref, dtype)
    assert_close(x.grad, x64.grad, dtype)
    t = torch.randn(9, 301, device=layer_device).to(dtype)
    assert_close(nl.euclidean_loss(x, t), 0.5 * ((x64 - t.double().cpu()) ** 2).sum(1).mean(), dtype)
