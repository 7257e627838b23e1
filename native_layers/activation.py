"""SINGA's activation layers: ReLU, Sigmoid, Tanh, STanh (1.7159 tanh(2x/3)) and `Activation(mode)`.

On CUDA tensors each runs one Triton kernel each way and saves only its output: every derivative here is a
function of the output. On CPU tensors they are torch's own ops, whose derivatives also use the output.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .convert import register_conversion
from .dispatch import kernels, use_triton_float

MODES = ("relu", "sigmoid", "tanh", "stanh")
STANH_A, STANH_B = 1.7159, 2.0 / 3.0


def _activation_torch(x: torch.Tensor, mode: str, inplace: bool) -> torch.Tensor:
    if mode == "relu":
        return torch.relu_(x) if inplace else torch.relu(x)
    if mode == "sigmoid":
        return torch.sigmoid_(x) if inplace else torch.sigmoid(x)
    if mode == "tanh":
        return torch.tanh_(x) if inplace else torch.tanh(x)
    # Out of place, then copied: an in-place chain would overwrite the tanh that its derivative reads.
    y = STANH_A * torch.tanh(STANH_B * x)
    return x.copy_(y) if inplace else y


class ActivationFunction(torch.autograd.Function):
    """The Triton kernels' activation of x, optionally in place."""

    @staticmethod
    def forward(ctx, x, mode, inplace):
        ctx.mode = mode
        y = kernels("activation").activation_forward(x, mode, out=x if inplace else None)
        if inplace:
            if y is not x:
                x.copy_(y)
            ctx.mark_dirty(x)
            y = x
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return kernels("activation").activation_backward(y, grad_y, ctx.mode), None, None


def activation(x: torch.Tensor, mode: str, inplace: bool = False) -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"Activation: mode must be one of {MODES}, got {mode!r}")
    if not use_triton_float(x):
        return _activation_torch(x, mode, inplace)
    return ActivationFunction.apply(x, mode, inplace)


class Activation(nn.Module):
    """SINGA's activation layer: `Activation("relu" | "sigmoid" | "tanh" | "stanh")`."""

    def __init__(self, mode: str = "relu", inplace: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Activation: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.inplace = inplace

    def forward(self, x):
        return activation(x, self.mode, self.inplace)

    def extra_repr(self):
        return f"mode={self.mode!r}" + (", inplace=True" if self.inplace else "")


class ReLU(nn.ReLU):
    def forward(self, x):
        return activation(x, "relu", self.inplace)


class Sigmoid(nn.Sigmoid):
    def forward(self, x):
        return activation(x, "sigmoid")


class Tanh(nn.Tanh):
    def forward(self, x):
        return activation(x, "tanh")


class STanh(nn.Module):
    """SINGA's scaled tanh, 1.7159 * tanh(2x/3) (LeCun's choice: unit variance in, unit gain near 0)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return activation(x, "stanh", self.inplace)


register_conversion(nn.ReLU, lambda m: ReLU(inplace=m.inplace))
register_conversion(nn.Sigmoid, lambda m: Sigmoid())
register_conversion(nn.Tanh, lambda m: Tanh())


class SoftmaxFunction(torch.autograd.Function):
    """The Triton kernels' softmax over the last dimension of a 2-d x; saves only the output."""

    @staticmethod
    def forward(ctx, x):
        y = kernels("softmax").softmax_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return kernels("softmax").softmax_backward(y, grad_y)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(x) / sum(exp(x)) along `dim`, computed stably (float32 inside for half precisions)."""
    if not use_triton_float(x):
        if x.dtype in (torch.float16, torch.bfloat16):
            return torch.softmax(x, dim, dtype=torch.float32).to(x.dtype)
        return torch.softmax(x, dim)
    if x.dim() == 0:
        return SoftmaxFunction.apply(x.reshape(1, 1)).reshape(())
    moved = x.movedim(dim, -1)
    y = SoftmaxFunction.apply(moved.reshape(-1, moved.shape[-1]))
    return y.reshape(moved.shape).movedim(-1, dim)


class Softmax(nn.Softmax):
    """nn.Softmax (same `dim` argument, including its legacy choice when dim is None)."""

    def forward(self, x):
        dim = self.dim if self.dim is not None else nn.functional._get_softmax_dim("softmax", x.dim(), 3)
        return softmax(x, dim)


register_conversion(nn.Softmax, lambda m: Softmax(m.dim))
