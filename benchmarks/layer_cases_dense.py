"""Dense-layer cases for benchmarks/layers.py: native layers against torch eager at realistic sizes.

Batch 256 x 4096 features for dense layers, activations, dropout and batch norm; 8192 x 32000 logits for the
loss (a language model's vocabulary). `sizes="cpu"`: 256 x 1024 features, 1024 x 1000 logits (ImageNet's
classes), a 10000 x 256 embedding; "small": sizes a smoke run finishes in seconds.
"""
import torch
import torch.nn as nn

import native_layers as nl
from benchmarks.layers import LayerCase


class _STanhTorch(nn.Module):
    """STanh in torch eager ops, the peer for the native STanh."""

    def forward(self, x):
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class _Copy(nn.Module):
    """x.clone(): its fwd_GBps is the device's copy bandwidth, the yardstick for memory-bound layers."""

    def forward(self, x):
        return x.clone()


class _EuclideanTorch(nn.Module):
    def forward(self, x, t):
        return 0.5 * ((x - t) ** 2).sum(1).mean()


def cases(device, dtype, sizes):
    batch, features = {"full": (256, 4096), "cpu": (256, 1024), "small": (64, 256)}[sizes]
    rows, classes = {"full": (8192, 32000), "cpu": (1024, 1000), "small": (64, 1000)}[sizes]
    vocab, dim, tokens = {"full": (32000, 1024, 8192), "cpu": (10000, 256, 4096), "small": (1000, 64, 512)}[sizes]
    size = torch.finfo(dtype).bits // 8
    elems = batch * features

    def on(module):
        return module.to(device=device, dtype=dtype)

    def activations():
        return (torch.randn(batch, features, device=device, dtype=dtype, requires_grad=True),)

    def logits():
        return (torch.randn(rows, classes, device=device, dtype=dtype, requires_grad=True),
                torch.randint(0, classes, (rows,), device=device))

    def pair():
        return (torch.randn(batch, features, device=device, dtype=dtype, requires_grad=True),
                torch.randn(batch, features, device=device, dtype=dtype))

    def tokens_in():
        return (torch.randint(0, vocab, (tokens,), device=device),)

    def linear_pair(activation):
        torch.manual_seed(0)
        native = on(nl.Linear(features, features, activation=activation))
        peer = nn.Linear(features, features)
        peer.load_state_dict(native.state_dict())
        peer = on(peer)
        if activation:
            peer = nn.Sequential(peer, {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[activation])
        return native, peer

    shape = f"{batch}x{features}"
    rw = 2 * elems * size  # read once, write once
    out = [
        LayerCase("copy (bandwidth reference)", shape, _Copy, _Copy, activations, min_bytes_forward=rw),
        LayerCase("Linear", f"{shape}->{features}", lambda: linear_pair(None)[0], lambda: linear_pair(None)[1],
                  activations),
        LayerCase("Linear+ReLU (fused)", f"{shape}->{features}", lambda: linear_pair("relu")[0],
                  lambda: linear_pair("relu")[1], activations),
        LayerCase("Linear+Tanh (fused)", f"{shape}->{features}", lambda: linear_pair("tanh")[0],
                  lambda: linear_pair("tanh")[1], activations),
        LayerCase("ReLU", shape, nl.ReLU, nn.ReLU, activations, min_bytes_forward=rw),
        LayerCase("Sigmoid", shape, nl.Sigmoid, nn.Sigmoid, activations, min_bytes_forward=rw),
        LayerCase("Tanh", shape, nl.Tanh, nn.Tanh, activations, min_bytes_forward=rw),
        LayerCase("STanh", shape, nl.STanh, _STanhTorch, activations, min_bytes_forward=rw),
        LayerCase("Dropout(0.5)", shape, lambda: nl.Dropout(0.5), lambda: nn.Dropout(0.5), activations,
                  min_bytes_forward=rw, deterministic=False),
        LayerCase("Softmax", shape, lambda: nl.Softmax(1), lambda: nn.Softmax(1), activations,
                  min_bytes_forward=rw),
        LayerCase("BatchNorm1d", shape, lambda: on(nl.BatchNorm1d(features)), lambda: on(nn.BatchNorm1d(features)),
                  activations, min_bytes_forward=rw),
        # The loss reads the logits once and writes one number per row.
        LayerCase("SoftmaxCrossEntropy", f"{rows}x{classes}", nl.SoftmaxCrossEntropy, nn.CrossEntropyLoss, logits,
                  min_bytes_forward=rows * classes * size),
        LayerCase("EuclideanLoss", shape, nl.EuclideanLoss, _EuclideanTorch, pair, min_bytes_forward=2 * elems * size),
    ]

    def embeddings(cls):
        def make():
            torch.manual_seed(0)
            return on(cls(vocab, dim))
        return make

    out.append(LayerCase("Embedding", f"{tokens} of {vocab}x{dim}", embeddings(nl.Embedding), embeddings(nn.Embedding),
                         tokens_in, min_bytes_forward=2 * tokens * dim * size))
    return out
