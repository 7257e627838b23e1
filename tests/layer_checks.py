"""What the native-layer tests share: comparison with a float64 reference (the paths a layer runs on are the
`layer_device` fixture in conftest.py)."""
import torch


# Absolute-plus-relative tolerances against a float64 reference, per dtype of the layer's computation.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 5e-2),
             torch.float64: (1e-10, 1e-10)}


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = ""):
    atol, rtol = TOLERANCE[dtype]
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    torch.testing.assert_close(actual.detach().double().cpu(), reference.detach().double().cpu(),
                               atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of t that requires grad: the reference computation's input."""
    return t.detach().double().cpu().requires_grad_(t.requires_grad)


def assert_grads_match(native_fn, ref_fn, x, grad_out=None, atol=1e-5, rtol=1e-5):
    """native_fn(x) and its input gradient against ref_fn on a float64 copy of x, for one random upstream gradient."""
    xn = x.detach().clone().requires_grad_()
    xr = x.detach().double().requires_grad_()
    y, y_ref = native_fn(xn), ref_fn(xr)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    if grad_out is None:
        grad_out = torch.randn(y_ref.shape, dtype=torch.float64, device=x.device)
    y.backward(grad_out.to(y.dtype))
    y_ref.backward(grad_out)
    torch.testing.assert_close(xn.grad.double(), xr.grad, atol=atol, rtol=rtol)


# Memory layouts for layout tests: dense in some order (the kernels run flat over the storage) and with gaps
# (the kernels run strided); "sliced" and "strided_all" need the most dimensions after merging.
LAYOUTS = ("contiguous", "reversed", "channels_last", "strided", "sliced", "strided_all")


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor with t's values in `layout`: contiguous; reversed (dimensions stored in reverse order, a
    transpose); channels_last (4-d); strided (every other element of the last dimension); sliced (a view
    that drops the first index of dimension 1); strided_all (every other element of every dimension)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "reversed":
        rev = tuple(range(t.dim() - 1, -1, -1))
        return t.permute(rev).contiguous().permute(rev)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return t.new_empty(*t.shape[:-1], 2 * t.shape[-1])[..., ::2].copy_(t)
    if layout == "sliced":
        return t.new_empty(t.shape[0], t.shape[1] + 1, *t.shape[2:])[:, 1:].copy_(t)
    if layout == "strided_all":
        return t.new_empty([2 * s for s in t.shape])[(slice(None, None, 2),) * t.dim()].copy_(t)
    raise ValueError(layout)


def kernel_launches(monkeypatch, module, name: str) -> list:
    """Records the (args, kwargs) of every launch of kernel `module.name` (which still runs)."""
    real, seen = getattr(module, name), []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args, kwargs))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Recorder())
    return seen
