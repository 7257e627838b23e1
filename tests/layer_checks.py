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
