"""SINGA's InnerProduct layer: `Linear`, with an optional fused activation (bias, then ReLU/sigmoid/tanh).

With an activation the forward is one matrix-multiply kernel (bias and activation in its epilogue) and the
backward applies the activation's derivative, computed from the saved output, while loading the output
gradient inside the two gradient products (the bias gradient comes out of the weight-gradient kernel).
On CPU tensors `linear` is torch's F.linear followed by torch's activation op; LinearFunction computes the
same in torch ops for callers that apply it directly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import register_conversion
from .dispatch import kernels, use_triton_float

_ACTIVATIONS = (None, "relu", "sigmoid", "tanh")


def _activate(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return z
    return {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation](z)


def _activation_grad(g: torch.Tensor, y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """g * act'(z), with the derivative written in terms of the output y = act(z)."""
    if activation is None:
        return g
    if activation == "relu":
        return g * (y > 0).to(g.dtype)
    if activation == "sigmoid":
        return g * y * (1 - y)
    return g * (1 - y * y)


class LinearFunction(torch.autograd.Function):
    """y = act(x @ W^T + b) on a 2-d x; saves x, W and (with an activation) y."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        if x.dtype != weight.dtype:
            raise TypeError(f"Linear: input has dtype {x.dtype} but the weight has {weight.dtype}")
        if use_triton_float(x):
            y = kernels("matmul").matmul(x, weight.t(), bias=bias, activation=activation)
        else:
            z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
            y = _activate(z, activation)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, y if activation else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        act = ctx.activation
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if use_triton_float(grad_y):
            mm = kernels("matmul").matmul
            if need_x:
                grad_x = mm(grad_y, weight, prologue_activation=act, prologue_output=y)
            if need_w:
                # The bias gradient (row sums of the scaled dy^T) comes out of the same kernel.
                out = mm(grad_y.t(), x, prologue_activation=act, prologue_output=y.t() if act else None,
                         bias_grad=need_b and ctx.has_bias)
                grad_w, grad_b = out if isinstance(out, tuple) else (out, None)
                grad_b = grad_b.to(weight.dtype) if grad_b is not None else None
            elif need_b:  # a frozen weight with a trainable bias: no product needed
                grad_b = _activation_grad(grad_y.float(), y.float() if act else None, act).sum(0).to(weight.dtype)
        else:
            grad_z = _activation_grad(grad_y, y, act)
            if need_x:
                grad_x = grad_z @ weight
            if need_w:
                grad_w = grad_z.t() @ x
            if need_b:
                grad_b = grad_z.sum(0)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """Functional form: act(x @ weight^T + bias) over the last dimension of x."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"Linear: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"Linear: input of shape {tuple(x.shape)} does not end in in_features={weight.shape[1]}")
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # As nn.Linear under autocast: the product runs in the autocast dtype.
        dt = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if not use_triton_float(x):
        if x.dtype != weight.dtype:
            raise TypeError(f"Linear: input has dtype {x.dtype} but the weight has {weight.dtype}")
        return _activate(F.linear(x, weight, bias), activation)
    lead = x.shape[:-1]
    y = LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, activation)
    return y.reshape(*lead, weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same arguments and state_dict) with an optional fused `activation` in ("relu",
    "sigmoid", "tanh"): `Linear(784, 256, activation="relu")` is one kernel each way on the GPU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 activation: str | None = None):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Linear: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act

    @classmethod
    def from_torch(cls, module: nn.Linear, activation: str | None = None) -> "Linear":
        """A native Linear sharing `module`'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Linear: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        new.activation = activation
        return new


register_conversion(nn.Linear, Linear.from_torch)


def fuse_linear_activations(model: nn.Module) -> nn.Module:
    """In every nn.Sequential of `model`, fold an activation (ReLU, Sigmoid, Tanh) that directly follows a
    native Linear into that Linear's fused epilogue, leaving nn.Identity in its place; returns the model.

    Opt-in (call it after convert()): the Linear's own output is no longer visible, e.g. to forward hooks.
    state_dict keys are unchanged (activations have no state).
    """
    fusable = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            lin, act = seq._modules[first], seq._modules[second]
            kind = next((mode for cls, mode in fusable.items() if isinstance(act, cls)), None)
            if type(lin) is Linear and lin.activation is None and kind is not None:
                lin.activation = kind
                seq._modules[second] = nn.Identity()
    return model
