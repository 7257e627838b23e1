"""The matrix-multiply kernels take Hopper's fast path when compiled for an H100 (sm_90), checked without a GPU.

A Triton kernel can be correct and still many times slower than cuBLAS: its dot may fall back to mma.sync
or FMA, its loads may not be pipelined (no async copies), or its registers may spill. This compiles each
product of `Linear` (forward, input gradient, weight gradient) for sm_90 with every tile configuration that
autotuning tries on the GPU, specialised as a launch on contiguous tensors is (unit strides are constants,
pointers and sizes divisible by 16), and checks the generated code: warp-group MMA (wgmma), async copies
into shared memory, no local-memory spills, and shared memory within the H100's 227 KiB per block.
Runs in a subprocess because kernels are interpreted objects once TRITON_INTERPRET=1 is set (conftest.py).
"""
import sys

from tests.test_kernels_compile import _compile_in_subprocess, _ptxas_report, compile_sm90

# The operands of a dense layer's three products and which strides are 1 for contiguous x, W and dy.
LINEAR_PRODUCTS = {
    "forward   y = x @ W^T": (dict(HAS_BIAS=True, EPI_ACT=1), ("stride_ak", "stride_bk", "stride_cn")),
    "input grad dx = dy @ W": (dict(PRO_ACT=1), ("stride_ak", "stride_bn", "stride_cn", "stride_yk")),
    "weight grad dW = dy^T @ x": (dict(PRO_ACT=1, BIAS_GRAD=True), ("stride_am", "stride_bn", "stride_cn",
                                                                  "stride_ym")),
}


def check_fast_path(label: str, compiled, num_stages: int) -> list[str]:
    from triton_kernels.matmul import SHARED_MEMORY_BYTES

    problems = []
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    registers, spilled = _ptxas_report(ptx)
    if "wgmma.mma_async" not in ptx:
        problems.append(f"{label}: no wgmma (the dot does not use Hopper's warp-group MMA)")
    if num_stages > 1 and "async_copy_global_to_local" not in ttgir and "async_tma" not in ttgir:
        problems.append(f"{label}: loads are not pipelined (no async copies)")
    if spilled:
        problems.append(f"{label}: {registers} registers, {spilled} bytes spilled")
    if compiled.metadata.shared > SHARED_MEMORY_BYTES:
        problems.append(f"{label}: {compiled.metadata.shared} bytes of shared memory")
    return problems


def main() -> int:
    from triton_kernels import matmul

    fn = matmul._matmul_kernel.fn
    problems, checked = [], 0
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32")):
        p = "*" + dtype
        pointers = dict(a_ptr=p, b_ptr=p, c_ptr=p, bias_ptr=p, y_ptr=p, dbias_ptr="*fp32")
        for product, (flags, unit_strides) in LINEAR_PRODUCTS.items():
            # The configurations autotuning tries for these operands: all in bf16, two in the other dtypes.
            size = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
            configs = [c for c in matmul._configs() if matmul.config_fits(c, size, flags.get("PRO_ACT", 0) != 0)]
            assert configs, f"no configuration left for {product} in {dtype}"
            for cfg in configs if dtype == "bf16" else configs[:2]:
                constexprs = {**dict(HAS_BIAS=False, EPI_ACT=0, PRO_ACT=0, BIAS_GRAD=False, PRECISION=precision,
                                     DOT_FP32=False), **cfg.kwargs, **flags, **{s: 1 for s in unit_strides}}
                label = f"{product} {dtype} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
                # Every pointer and size divisible by 16, as for contiguous tensors of such sizes.
                aligned = [a for a in fn.arg_names if a not in constexprs]
                compiled = compile_sm90(fn, pointers, constexprs, aligned, cfg.num_warps, cfg.num_stages)
                problems += check_fast_path(label, compiled, cfg.num_stages)
                checked += 1
    print("\n".join(problems) or f"all {checked} matmul variants take the sm_90 fast path")
    return 1 if problems else 0


def test_linear_products_use_wgmma_pipelined_without_spills():
    _compile_in_subprocess(timeout=600, module="tests.test_kernels_sm90_codegen")


if __name__ == "__main__":
    sys.exit(main())
