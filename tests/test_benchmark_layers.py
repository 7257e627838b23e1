"""benchmarks/layers.py checks each native layer against torch before timing it."""
import math

import torch
import torch.nn as nn

import native_layers as nl
from benchmarks import layers
from benchmarks.layers import LayerCase, check


def _inputs():
    torch.manual_seed(1)
    return (torch.randn(5, 7, requires_grad=True),)


def test_check_gives_torch_the_native_parameters():
    # Separately initialised layers agree once check() has copied the native parameters into torch's.
    case = LayerCase("Linear", "5x7->3", lambda: nl.Linear(7, 3, activation="relu"),
                     lambda: nn.Sequential(nn.Linear(7, 3), nn.ReLU()), _inputs)
    fwd_err, grad_err = check(case)
    assert fwd_err < 1e-6 and grad_err < 1e-6


def test_check_finds_a_wrong_forward_and_a_wrong_gradient():
    assert check(LayerCase("ReLU", "5x7", nl.ReLU, nn.Tanh, _inputs))[0] > 0.1

    class WrongGradient(torch.autograd.Function):  # right forward, doubled input gradient
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, g):
            return g * 6

    class Native(nn.Module):
        def forward(self, x):
            return WrongGradient.apply(x)

    class Torch(nn.Module):
        def forward(self, x):
            return x * 3

    fwd_err, grad_err = check(LayerCase("Scale", "5x7", Native, Torch, _inputs))
    assert fwd_err == 0 and grad_err > 0.4


def test_check_skips_dropout():
    assert all(math.isnan(e) for e in check(LayerCase("Dropout", "5x7", lambda: nl.Dropout(0.5),
                                                       lambda: nn.Dropout(0.5), _inputs, deterministic=False)))


def test_small_run_checks_then_writes_rows(monkeypatch, tmp_path):
    written = {}
    monkeypatch.setattr(layers, "write_csv", lambda name, rows: written.setdefault(name, rows) and tmp_path / "x.csv")
    layers.main(["--small", "--only", "LRN"])
    rows = written["layers"]
    assert rows and all(r["layer"] == "LRN" and r["correct"] == "yes" and r["fwd_err"] < 1e-5 for r in rows)


def test_cpu_sizes_time_resnet18_activations():
    cases = {(c.layer, c.shape) for c in layers.discover_cases(torch.device("cpu"), torch.float32, "cpu")}
    assert {("BatchNorm2d", "resnet18 32x64x28x28 64ch"), ("ReLU", "resnet18 32x64x28x28 64ch")} <= cases
