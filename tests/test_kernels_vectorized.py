"""The memory-bound layers move their tensors in 16-byte vectors when compiled for an H100 (sm_90), no GPU needed.

A memory-bound kernel reaches the device's copy bandwidth only if each thread loads and stores 16 bytes at a
time; scalar accesses can cost it half its speed while giving the same answers. This runs each layer's forward
and backward on CPU tensors with every kernel launch recorded instead of run (the launch functions compute
all arguments as on the GPU), compiles each recorded launch for sm_90 specialised exactly as Triton would
(pointers 16-byte aligned, integers equal to 1 made constants, integers divisible by 16 marked so), and
checks the PTX for 128-bit global loads and stores (`ld.global.v4`, `st.global.v4`). Shapes follow
benchmarks/layers.py (4096 features, a 32000-word vocabulary, cuda-convnet's LRN planes), with fewer rows.
Runs in a subprocess because kernels are interpreted objects once TRITON_INTERPRET=1 is set (conftest.py).
"""
import contextlib
import importlib
import os
import pkgutil
import re
import sys

from tests.test_kernels_compile import _compile_in_subprocess, compile_sm90

# Kernels whose stores are per-row or per-channel results (losses, partial sums), not tensors of the input's
# size: only their loads need to be vectors.
REDUCTION_STORES = {"_bn_partial_stats_kernel", "_bn_partial_grad_kernel", "_ce_forward_kernel",
                    "_euclidean_forward_kernel"}


def _cases(torch, dtype):
    """(name, module, inputs) at the benchmark's feature sizes."""
    import native_layers as nl

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    dense = (64, 4096)
    return [
        ("ReLU", nl.ReLU(), (rand(*dense),)),
        ("STanh", nl.STanh(), (rand(*dense),)),
        ("Dropout", nl.Dropout(0.5), (rand(*dense),)),
        ("Softmax", nl.Softmax(1), (rand(*dense),)),
        ("BatchNorm1d", nl.BatchNorm1d(4096).to(dtype), (rand(*dense),)),
        ("SoftmaxCrossEntropy", nl.SoftmaxCrossEntropy(), (rand(16, 32000), torch.randint(0, 32000, (16,)))),
        ("EuclideanLoss", nl.EuclideanLoss(), (rand(*dense), torch.randn(*dense, dtype=dtype))),
        ("Embedding", nl.Embedding(1000, 1024).to(dtype), (torch.randint(0, 1000, (512,)),)),
        ("LRN 16x16", nl.LRN(3, 5e-5, 0.75, 1.0), (rand(4, 32, 16, 16),)),
        ("LRN 8x8", nl.LRN(3, 5e-5, 0.75, 1.0), (rand(4, 32, 8, 8),)),
    ]


@contextlib.contextmanager
def _recording(launches):
    """Every jitted or autotuned kernel in triton_kernels replaced by an object that records its launches."""
    import triton_kernels
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    # Import every module before patching any, so that no module imports a recorder in place of a kernel.
    modules = [importlib.import_module(f"triton_kernels.{m.name}") for m in pkgutil.iter_modules(triton_kernels.__path__)]
    patched = [(m, name, obj) for m in modules for name, obj in vars(m).items()
               if isinstance(obj, (JITFunction, Autotuner))]
    for m, name, obj in patched:
        setattr(m, name, Recorder(obj))
    try:
        yield
    finally:
        for m, name, obj in patched:
            setattr(m, name, obj)


def _compile_launch(kernel, args, kwargs):
    """Compile a recorded launch for sm_90, specialised as Triton specialises that call; returns the
    kernel's name and its PTX."""
    import torch
    from triton.runtime.autotuner import Autotuner

    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    while not hasattr(kernel, "arg_names"):  # autotuner or heuristics around the jitted function
        if isinstance(kernel, Autotuner):
            config = kernel.configs[0]
            kwargs.update(config.kwargs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel = kernel.fn
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
             torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs, aligned = {}, {}, []
    for i, name in enumerate(kernel.arg_names):
        value = values[name]
        if name in kwargs or kernel.params[i].is_constexpr or value is None:
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + types[value.dtype]
            aligned.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            constexprs[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
        else:
            signature[name] = "fp32"
    compiled = compile_sm90(kernel, signature, constexprs, aligned, options["num_warps"], options["num_stages"])
    return kernel.__name__, compiled.asm["ptx"]


def main() -> int:
    os.environ["SINGA_FORCE_TRITON"] = "1"  # CPU tensors take the Triton path, whose launches are recorded
    import torch

    problems, checked = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for name, module, inputs in _cases(torch, dtype):
            launches = []
            with _recording(launches):
                out = module(*inputs)
                out.backward(torch.randn_like(out) if out.dim() else None)
            for kernel, args, kwargs in launches:
                kernel_name, ptx = _compile_launch(kernel, args, dict(kwargs))
                checked += 1
                missing = [op for op in ("ld", "st") if not re.search(rf"\b{op}\.global(\.[a-z0-9]+)*\.v4\b", ptx)
                           and not (op == "st" and kernel_name in REDUCTION_STORES)]
                if missing:
                    problems.append(f"{name} {dtype}: {kernel_name} has no 128-bit global "
                                    f"{' or '.join({'ld': 'loads', 'st': 'stores'}[m] for m in missing)}")
    print("\n".join(problems) or f"{checked} kernel launches use 128-bit loads and stores")
    return 1 if problems or not checked else 0


def test_memory_bound_kernels_use_vector_accesses():
    _compile_in_subprocess(module="tests.test_kernels_vectorized", timeout=600)


if __name__ == "__main__":
    sys.exit(main())
