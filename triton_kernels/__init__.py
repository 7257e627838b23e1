"""Triton GPU kernels for SINGA's layers, with thin launch functions on torch tensors (no autograd here).

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 was set before
triton was first imported; SINGA_FORCE_TRITON=1 asks for that, so it is set here before importing triton.
"""
import os

if os.environ.get("SINGA_FORCE_TRITON") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
