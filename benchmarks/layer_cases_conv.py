"""Convolution, pooling, LRN, batch-norm and ReLU cases for benchmarks/layers.py: the CIFAR-10 "cuda-convnet"
net and ResNet-18, at batch 128; at batch 32 with ResNet-18 at half its image size for `sizes="cpu"`
(ResNet-18's first stage is then 32x64x28x28); at batch 2 and a quarter of the image size for "small"."""
from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.layers import LayerCase
from native_layers import LRN, AvgPool2d, BatchNorm2d, Conv2d, MaxPool2d, ReLU


def _conv(cin, cout, k, stride=1, pad=0, relu=False):
    native = lambda: Conv2d(cin, cout, k, stride, pad, activation="relu" if relu else None)
    ref = (lambda: nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad), nn.ReLU())) if relu else \
        (lambda: nn.Conv2d(cin, cout, k, stride, pad))
    name = "Conv2d+ReLU" if relu else "Conv2d"
    return name, f"{cin}->{cout} k{k} s{stride} p{pad}", cin, native, ref


def _pool(kind, channels, k, stride, pad=0, ceil_mode=False):
    native_cls, torch_cls = (MaxPool2d, nn.MaxPool2d) if kind == "max" else (AvgPool2d, nn.AvgPool2d)
    make = lambda cls: (lambda: cls(k, stride, pad, ceil_mode=ceil_mode))
    return f"{native_cls.__name__}", f"{channels}ch k{k} s{stride} p{pad}", channels, make(native_cls), make(torch_cls)


def _lrn(channels, size, alpha, beta, k):
    return ("LRN", f"{channels}ch size{size}", channels, lambda: LRN(size, alpha, beta, k),
            lambda: nn.LocalResponseNorm(size, alpha, beta, k))


def _batchnorm(channels):
    return "BatchNorm2d", f"{channels}ch", channels, lambda: BatchNorm2d(channels), lambda: nn.BatchNorm2d(channels)


def _relu(channels):
    return "ReLU", f"{channels}ch", channels, ReLU, nn.ReLU


# (layer spec, input height/width) in network order
CUDA_CONVNET = [
    (_conv(3, 32, 5, 1, 2), 32), (_conv(3, 32, 5, 1, 2, relu=True), 32), (_pool("max", 32, 3, 2, ceil_mode=True), 32),
    (_lrn(32, 3, 5e-5, 0.75, 1.0), 16),
    (_conv(32, 32, 5, 1, 2), 16), (_conv(32, 32, 5, 1, 2, relu=True), 16), (_pool("avg", 32, 3, 2, ceil_mode=True), 16),
    (_lrn(32, 3, 5e-5, 0.75, 1.0), 8),
    (_conv(32, 64, 5, 1, 2), 8), (_pool("avg", 64, 3, 2, ceil_mode=True), 8),
]
RESNET18 = [
    (_conv(3, 64, 7, 2, 3), 224), (_pool("max", 64, 3, 2, 1), 112),
    (_conv(64, 64, 3, 1, 1), 56), (_batchnorm(64), 56), (_relu(64), 56),
    (_conv(64, 128, 3, 2, 1), 56), (_conv(64, 128, 1, 2, 0), 56),
    (_conv(128, 128, 3, 1, 1), 28), (_conv(128, 256, 3, 2, 1), 28), (_conv(256, 256, 3, 1, 1), 14),
    (_batchnorm(256), 14), (_conv(256, 512, 3, 2, 1), 14), (_conv(512, 512, 3, 1, 1), 7), (_pool("avg", 512, 7, 7), 7),
]


def cases(device, dtype, sizes):
    batch = {"full": 128, "cpu": 32, "small": 2}[sizes]
    out = []
    for net, specs in [("cuda-convnet", CUDA_CONVNET), ("resnet18", RESNET18)]:
        scale = {"full": 1, "cpu": 2 if net == "resnet18" else 1, "small": 4}[sizes]
        for (layer, shape, channels, make_native, make_torch), size in specs:
            hw = max(size // scale, 7)

            def inputs(c=channels, hw=hw):
                return (torch.randn(batch, c, hw, hw, device=device, dtype=dtype, requires_grad=True),)

            place = lambda make: (lambda: make().to(device=device, dtype=dtype))
            itemsize = torch.finfo(dtype).bits // 8
            out.append(LayerCase(layer, f"{net} {batch}x{channels}x{hw}x{hw} {shape}", place(make_native),
                                 place(make_torch), inputs,
                                 min_bytes_forward=2 * batch * channels * hw * hw * itemsize
                                 if layer in ("LRN", "BatchNorm2d", "ReLU") else 0))
    return out
