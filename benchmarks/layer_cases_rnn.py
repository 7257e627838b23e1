"""Recurrent-layer cases for benchmarks/layers.py: native GRU and LSTM against torch.nn.GRU/LSTM (cuDNN on a GPU).

Batch 64, sequence 128, hidden 1024 (input 1024) on a GPU; batch 32, sequence 64, hidden 256 for
`sizes="cpu"`; batch 8, sequence 16, hidden 64 for "small". Each case times the output sequence (the loss
reads every step's output), time-major input.
"""
import torch
import torch.nn as nn

import native_layers as nl
from benchmarks.layers import LayerCase


class _Outputs(nn.Module):
    """The layer's output sequence alone (layers.py times and checks modules that return one tensor)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def cases(device, dtype, sizes):
    batch, seq, hidden = {"full": (64, 128, 1024), "cpu": (32, 64, 256), "small": (8, 16, 64)}[sizes]

    def make(cls):
        def build():
            torch.manual_seed(0)
            return _Outputs(cls(hidden, hidden)).to(device=device, dtype=dtype)
        return build

    def inputs():
        return (torch.randn(seq, batch, hidden, device=device, dtype=dtype, requires_grad=True),)

    shape = f"{seq}x{batch}x{hidden}"
    return [LayerCase("GRU", shape, make(nl.GRU), make(nn.GRU), inputs),
            LayerCase("LSTM", shape, make(nl.LSTM), make(nn.LSTM), inputs)]
