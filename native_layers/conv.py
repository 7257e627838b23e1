"""SINGA's Convolution layer: `Conv2d`, a drop-in torch.nn.Conv2d running implicit-GEMM Triton kernels.

Forward, input gradient and weight gradient are Triton kernels on CUDA tensors (triton_kernels/conv.py);
on CPU tensors `conv2d` is torch's F.conv2d with torch's derivative (Conv2dFunction runs torch's aten ops
there too, for callers that apply it directly). `activation="relu"` fuses bias and ReLU into the forward's
epilogue, and the ReLU mask into the one pass that lays dy out for both backward kernels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .convert import register_conversion
from .dispatch import kernels, use_triton

ACTIVATIONS = (None, "relu")


def _out_size(size, kernel, stride, pad_before, pad_after, dilation):
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _out_hw(x_shape, weight_shape, stride, pads, dilation):
    """The output's (height, width); a ValueError where the (dilated) kernel does not fit the padded input."""
    (pt, pb), (pl, pr) = pads
    kh, kw = weight_shape[2:]
    out_hw = (_out_size(x_shape[2], kh, stride[0], pt, pb, dilation[0]),
              _out_size(x_shape[3], kw, stride[1], pl, pr, dilation[1]))
    if out_hw[0] <= 0 or out_hw[1] <= 0:
        raise ValueError(f"conv2d: input {tuple(x_shape)} is smaller than the (dilated) kernel "
                         f"{tuple(weight_shape[2:])} with padding {pads}")
    return out_hw


def _paddings(padding, kernel_hw, stride, dilation):
    """((top, bottom), (left, right)) for an int, a pair, 'valid' or 'same' (extra padding at the end, as torch)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if stride != (1, 1):
            raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
        pads = []
        for k, d in zip(kernel_hw, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    ph, pw = _pair(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"conv2d: negative padding {padding}")
    return (ph, ph), (pw, pw)


class Conv2dFunction(torch.autograd.Function):
    """conv2d(x, weight, bias) with `pads` = ((top, bottom), (left, right)), optionally followed by ReLU."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pads, dilation, groups, relu):
        (pt, pb), (pl, pr) = pads
        out_hw = _out_hw(x.shape, weight.shape, stride, pads, dilation)
        triton_path = use_triton(x)
        if triton_path:
            y = kernels("conv").conv2d_forward(x, weight, bias, stride, (pt, pl), dilation, groups, out_hw, relu)
        else:
            y = F.conv2d(_pad_end(x, pads), weight, bias, stride, (pt, pl), dilation, groups)
            if relu:
                y = y.relu_()  # y is this call's own tensor: no second output
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.conf = (stride, pads, dilation, groups, relu, bias is not None, triton_path)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        stride, pads, dilation, groups, relu, has_bias, triton_path = ctx.conf
        (pt, pb), (pl, pr) = pads
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if triton_path:
            k = kernels("conv")
            dy = k.conv2d_grad_output(grad_y, y if relu else None)
            if need_x:
                dx = k.conv2d_input_grad(dy, weight, x.shape, stride, (pt, pl), dilation, groups)
            if need_w or need_b:
                dw, db = k.conv2d_weight_grad(dy, x, weight.shape, stride, (pt, pl), dilation, groups, has_bias)
        else:
            if relu:
                grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)  # torch's ReLU derivative: one pass
            xp = _pad_end(x, pads)
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad_y, xp, weight, [weight.shape[0]] if has_bias else None, list(stride), [pt, pl],
                list(dilation), False, [0, 0], groups, [need_x, need_w, need_b and has_bias])
            if dx is not None and xp is not x:
                dx = dx[:, :, :x.shape[2], :x.shape[3]]
        return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                None, None, None, None, None)


def _pad_end(x, pads):
    """x zero-padded at the bottom/right by what exceeds the top/left padding (asymmetric 'same' padding)."""
    (pt, pb), (pl, pr) = pads
    if pb == pt and pr == pl:
        return x
    return F.pad(x, (0, pr - pl, 0, pb - pt))


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """torch.nn.functional.conv2d with SINGA's kernels; `activation="relu"` fuses a ReLU after the bias.

    Accepts a batched (N, C, H, W) or unbatched (C, H, W) input, as torch does."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv2d: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() == 3:
        return conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, activation).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"conv2d: expected a 3-D or 4-D input, got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"conv2d: expected input with {weight.shape[1] * groups} channels (weight "
                         f"{tuple(weight.shape)}, groups={groups}), got input of shape {tuple(x.shape)}")
    if not torch.is_autocast_enabled(x.device.type) and (
            x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype)):
        raise TypeError(f"conv2d: input ({x.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must have the same dtype")
    if torch.is_autocast_enabled(x.device.type):
        # Convolution is on autocast's lower-precision list: run it as torch.nn.Conv2d would under autocast.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    stride, dilation = _pair(stride), _pair(dilation)
    pads = _paddings(padding, weight.shape[2:], stride, dilation)
    if not use_triton(x):
        # torch's convolution and its derivative, the ReLU in place on the convolution's own output.
        _out_hw(x.shape, weight.shape, stride, pads, dilation)
        y = F.conv2d(_pad_end(x, pads), weight, bias, stride, (pads[0][0], pads[1][0]), dilation, groups)
        return y.relu_() if activation == "relu" else y
    return Conv2dFunction.apply(x, weight, bias, stride, pads, dilation, groups, activation == "relu")


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d with SINGA's implicit-GEMM kernels; same arguments and state_dict keys, plus
    `activation=None | "relu"` to fuse a ReLU into the convolution."""

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Conv2d: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            # reflect / replicate / circular padding is materialised first, as torch.nn.Conv2d does.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, self.activation)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", activation={self.activation!r}" if self.activation else "")

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, activation: str | None = None) -> "Conv2d":
        """A native Conv2d sharing `conv`'s parameters (the same Parameter objects, so optimizers still hold them)."""
        native = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                     activation=activation)
        native.weight = conv.weight
        native.bias = conv.bias
        return native


register_conversion(nn.Conv2d, Conv2d.from_torch)
