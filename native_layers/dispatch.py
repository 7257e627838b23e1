"""Which implementation a native layer runs: Triton kernels for CUDA tensors, torch ops for CPU tensors.

SINGA_FORCE_TRITON=1 sends CPU tensors through the Triton kernels too (in Triton's interpreter), which is
how the kernels are tested on machines without a GPU.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton_kernels")
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def force_triton() -> bool:
    return os.environ.get("SINGA_FORCE_TRITON") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when the layer should run its Triton kernels on `x`."""
    if x.is_cuda:
        return triton_available()
    return force_triton() and triton_available()


def kernels(name: str):
    """The kernel module `triton_kernels.<name>`, imported on first use (triton is optional on CPU hosts)."""
    return importlib.import_module(f"triton_kernels.{name}")


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton_float(x: torch.Tensor) -> bool:
    """use_triton(x) for the dtypes the kernels are written for; float64 stays in torch, where it is exact
    (the kernels compute in float32)."""
    return x.dtype in KERNEL_DTYPES and use_triton(x)
