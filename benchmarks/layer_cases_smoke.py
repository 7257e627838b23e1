"""A torch-only case that keeps the layer benchmark runnable while native layers are added."""
import torch

from benchmarks.layers import LayerCase


def cases(device, dtype, small):
    n, f = (64, 128) if small else (256, 4096)

    def inputs():
        return (torch.randn(n, f, device=device, dtype=dtype, requires_grad=True),)

    return [LayerCase("torch.nn.GELU (reference)", f"{n}x{f}", lambda: torch.nn.GELU(), lambda: torch.nn.GELU(),
                      inputs, min_bytes_forward=2 * n * f * torch.finfo(dtype).bits // 8)]
