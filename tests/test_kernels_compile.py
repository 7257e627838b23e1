"""Every layer kernel compiles for an H100 (sm_90) on a host without a GPU.

The interpreter runs kernels as numpy code and accepts things the GPU compiler rejects (types that do not
unify, scalar masks, block shapes); compiling ahead of time through ptxas catches those here. The convolution
kernels are also checked for register spills (ptxas -v), as the GPU launches them. Runs in a subprocess
because kernels are interpreted objects once TRITON_INTERPRET=1 is set (tests/conftest.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _variants():
    """(kernel, signature, constexprs, num_warps) for each kernel, with its widest set of features."""
    from triton_kernels import activation, batchnorm, cross_entropy, dropout, embedding, euclidean, matmul, softmax

    def i32(*names):
        return {n: "i32" for n in names}

    strides = i32("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn", "stride_ym",
                  "stride_yk")
    out = []
    for dt, precision in [("fp32", "ieee"), ("bf16", "tf32")]:
        p = "*" + dt
        mm = dict(a_ptr=p, b_ptr=p, c_ptr=p, bias_ptr=p, y_ptr=p, dbias_ptr="*fp32", **i32("M", "N", "K"), **strides)
        out.append((matmul._matmul_kernel.fn, mm, dict(HAS_BIAS=True, EPI_ACT=3, PRO_ACT=0, BIAS_GRAD=False,
                    PRECISION=precision, DOT_FP32=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), 4))
        out.append((matmul._matmul_kernel.fn, mm, dict(HAS_BIAS=False, EPI_ACT=0, PRO_ACT=2, BIAS_GRAD=True,
                    PRECISION=precision, DOT_FP32=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), 4))
    p = "*bf16"
    # Elementwise kernels: flat (NDIM=0) and strided over four dimensions with 64-bit sizes and strides.
    for ndim, ints in ((0, "i32"), (4, "i64")):
        sizes = {a: ints for a in ("n", "size1", "size2", "size3", *(f"s{t}{d}" for t in "xygdo" for d in range(4)))}
        out += [
            (activation._activation_forward_kernel, dict(x_ptr=p, y_ptr=p, **sizes), dict(MODE=4, NDIM=ndim,
             BLOCK=1024), 4),
            (activation._activation_backward_kernel, dict(y_ptr=p, g_ptr=p, dx_ptr=p, **sizes),
             dict(MODE=4, NDIM=ndim, BLOCK=1024), 4),
            (dropout._dropout_kernel, dict(x_ptr=p, out_ptr=p, p="fp32", scale="fp32", seed="i64", **sizes),
             dict(NDIM=ndim, BLOCK=1024), 4),
        ]
    out += [
        (softmax._softmax_forward_kernel, dict(x_ptr=p, y_ptr=p, **i32("C", "stride_xr", "stride_xc", "stride_yr")),
         dict(ONE_BLOCK=False, BLOCK=4096), 8),
        (softmax._softmax_backward_kernel, dict(y_ptr=p, g_ptr=p, dx_ptr=p, **i32("C", "stride_yr", "stride_gr",
         "stride_gc", "stride_dr")), dict(ONE_BLOCK=True, BLOCK=4096), 8),
        (euclidean._euclidean_forward_kernel, dict(x_ptr=p, t_ptr=p, loss_ptr="*fp32", **i32("D", "stride_xr",
         "stride_xc", "stride_tr", "stride_tc")), dict(BLOCK=4096), 4),
        (euclidean._euclidean_backward_kernel, dict(x_ptr=p, t_ptr=p, scale_ptr="*fp32", dx_ptr=p, dt_ptr=p,
         **i32("D", "stride_xr", "stride_xc", "stride_tr", "stride_tc", "stride_scale")),
         dict(WRITE_DX=True, WRITE_DT=True, BLOCK=1024), 4),
        (embedding._embedding_forward_kernel, dict(idx_ptr="*i64", w_ptr=p, out_ptr=p, **i32("n", "D", "stride_wr",
         "stride_wc")), dict(BLOCK_I=16, BLOCK_D=128), 4),
        (embedding._embedding_backward_kernel, dict(sorted_ptr="*i64", order_ptr="*i64", g_ptr=p, dw_ptr=p,
         **i32("n", "D", "stride_gr", "stride_gc", "padding_idx")), dict(SCALE_BY_FREQ=True, BLOCK_D=128), 4),
    ]
    ce = dict(x_ptr=p, w_ptr="*fp32", **i32("C", "stride_xr", "stride_xc", "stride_tr", "stride_tc", "ignore_index"),
              smoothing="fp32")
    for prob in (False, True):
        t = p if prob else "*i64"
        flags = dict(HAS_WEIGHT=True, PROB_TARGET=prob, SMOOTH=True, BLOCK=4096)
        out.append((cross_entropy._ce_forward_kernel, dict(ce, t_ptr=t, loss_ptr="*fp32", lse_ptr="*fp32",
                    coef_ptr="*fp32", valid_ptr="*fp32"), flags, 8))
        out.append((cross_entropy._ce_backward_kernel, dict(ce, t_ptr=t, lse_ptr="*fp32", coef_ptr="*fp32",
                    scale_ptr="*fp32", dx_ptr=p, **i32("stride_scale", "stride_dr")), flags, 8))
    bn = dict(**i32("R", "C", "S", "stride_n", "stride_c", "stride_s"))
    stats = {n: "*fp32" for n in ("pivot_ptr", "mean_ptr", "invstd_ptr")}
    for tiles in (dict(R_AXIS=0, BLOCK_R=64, BLOCK_C=64), dict(R_AXIS=1, BLOCK_R=256, BLOCK_C=16)):
        out += _batchnorm_variants(batchnorm, p, bn, stats, tiles, i32)
    return out + _vision_variants()


def _vision_variants():
    """Pooling and LRN (convolution: _conv_variants); arguments not named in a signature are i32."""
    from triton_kernels import lrn, pool

    f, i, b = "*fp32", "*i64", "*bf16"
    scalars = dict(alpha="fp32", beta="fp32", k="fp32")
    return [
        (pool._max_pool2d_fwd_kernel, dict(x_ptr=b, y_ptr=b, idx_ptr=i), dict(BLOCK=256), 4),
        (pool._max_pool2d_bwd_kernel, dict(dy_ptr=b, idx_ptr=i, dx_ptr=b), dict(BLOCK=256), 4),
        (pool._avg_pool2d_fwd_kernel, dict(x_ptr=b, y_ptr=b), dict(COUNT_INCLUDE_PAD=False, DIVISOR=0, BLOCK=256), 4),
        (pool._avg_pool2d_bwd_kernel, dict(dy_ptr=b, dx_ptr=b), dict(COUNT_INCLUDE_PAD=True, DIVISOR=3, BLOCK=256), 4),
        (lrn._lrn_fwd_kernel, dict(x_ptr=b, y_ptr=b, scale_ptr=f, **scalars),
         dict(X_DENSE=True, BLOCK_C=8, BLOCK_S=128), 4),
        (lrn._lrn_bwd_kernel, dict(dy_ptr=b, x_ptr=b, scale_ptr=f, dx_ptr=b, **scalars),
         dict(DY_DENSE=False, X_DENSE=True, BLOCK_C=8, BLOCK_S=128), 4),
    ]


# How the GPU launches the convolution kernels (triton_kernels/conv.py): activations and weights read with
# channels innermost (unit channel strides, which triton specialises to constants), outputs NCHW (unit
# width strides), and, for layers with multiples of 16 channels, sizes and other strides divisible by 16.
_CONV_SPECIALISATION = {
    "_conv2d_fwd_kernel": dict(unit=["sxc", "swc", "syw"], div16=["C_G", "K_G", "sxn", "sxh", "sxw", "swk", "swh",
                                                                 "sww", "syn", "syc"]),
    "_conv2d_dgrad_kernel": dict(unit=["sdyc", "swc", "sxw"], div16=["C_G", "K_G", "sdyn", "sdyh", "sdyw", "swk",
                                                                    "swh", "sww", "sxn", "sxc"]),
    "_conv2d_wgrad_kernel": dict(unit=["sdyc", "sxw"], div16=["C_G", "K_G", "sdyn", "sdyh", "sdyw", "sxn", "sxc"]),
}


def _conv_variants(all_tiles: bool):
    """(kernel, signature, constexprs, num_warps, num_stages, divisible-by-16 args) for the convolution kernels
    with fp16 and with fp32 (TF32) operands: every autotuned tile if `all_tiles`, else the first of each list."""
    from triton_kernels import conv

    out = []
    for dt, precision in [("fp16", "ieee"), ("fp32", "tf32")]:
        p = "*" + dt
        gemm_tiles = conv._GEMM_TILES + (conv._GEMM_TILES_16BIT if dt == "fp16" else [])
        # The store order is the one conv's launches use under the Triton release being tested.
        store = conv.CHANNEL_MAJOR_STORE
        kernels = [(conv._conv2d_fwd_kernel, dict(x_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p), gemm_tiles,
                    [dict(HAS_BIAS=True, RELU=True, FLAT_K=flat, CHANNEL_MAJOR=store) for flat in (False, True)]),
                   (conv._conv2d_dgrad_kernel, dict(dy_ptr=p, w_ptr=p, dx_ptr=p), gemm_tiles,
                    [dict(FLAT_K=flat, CHANNEL_MAJOR=store) for flat in (False, True)]),
                   (conv._conv2d_wgrad_kernel, dict(dy_ptr=p, x_ptr=p, dw_part_ptr="*fp32", db_part_ptr="*fp32"),
                    conv._WGRAD_TILES, [dict(HAS_BIAS=True)])]
        for fn, signature, tiles, flag_sets in kernels:
            spec = _CONV_SPECIALISATION[fn.__name__]
            for m, n, k, warps, stages in tiles if all_tiles else tiles[:1]:
                for flags in flag_sets:
                    constexprs = dict(flags, PRECISION=precision, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8,
                                      **{a: 1 for a in spec["unit"]})
                    out.append((fn, signature, constexprs, warps, stages, spec["div16"]))
    out.append((conv._sum_splits_kernel, dict(part_ptr="*fp32", out_ptr="*bf16"), dict(BLOCK=1024), 4, 3, []))
    return out


def compile_sm90(fn, types: dict, constexprs: dict, aligned, num_warps: int, num_stages: int):
    """Compile the jitted `fn` for an H100 (sm_90): arguments in `constexprs` are constants, the others have
    the types in `types` (default i32), and those named in `aligned` are marked divisible by 16, as Triton
    marks 16-byte aligned pointers and integers that are multiples of 16 at a launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill-store bytes) of the one kernel in `ptx`, from ptxas -v for sm_90a."""
    import re
    import tempfile

    from triton.backends.nvidia import compiler

    try:
        ptxas = compiler.get_ptxas(90)
    except TypeError:  # older triton: no architecture argument
        ptxas = compiler.get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return (int(re.search(r"Used (\d+) registers", log).group(1)),
            int(re.search(r"(\d+) bytes spill stores", log).group(1)))


def _batchnorm_variants(batchnorm, p, bn, stats, tiles, i32):
    return [
        (batchnorm._bn_partial_stats_kernel, dict(x_ptr=p, count_ptr="*fp32", mean_ptr="*fp32", m2_ptr="*fp32",
         rows_per_program="i32", **bn), tiles, 4),
        (batchnorm._bn_partial_grad_kernel, dict(x_ptr=p, g_ptr=p, sum_g_ptr="*fp32", sum_gx_ptr="*fp32",
         rows_per_program="i32", **stats, **bn, **i32("gstride_n", "gstride_c", "gstride_s")), tiles, 4),
        (batchnorm._bn_forward_kernel, dict(x_ptr=p, y_ptr=p, w_ptr="*fp32", b_ptr="*fp32", **stats, **bn),
         dict(AFFINE=True, **tiles), 4),
        (batchnorm._bn_backward_kernel, dict(x_ptr=p, g_ptr=p, dx_ptr=p, w_ptr="*fp32", sum_g_ptr="*fp32",
         sum_gx_ptr="*fp32", **stats, **bn, **i32("gstride_n", "gstride_c", "gstride_s")),
         dict(AFFINE=True, BATCH_STATS=True, **tiles), 4),
    ]


def main(argv: list[str]) -> int:
    """Compile every layer kernel, and the convolution kernels checking ptxas reports no register spills;
    with --all-conv-tiles, compile each autotuned convolution tile instead."""
    all_tiles = "--all-conv-tiles" in argv
    variants = [] if all_tiles else [(*v, 3, []) for v in _variants()]
    variants += [(*v, True) for v in _conv_variants(all_tiles)]
    failures = []
    for fn, signature, constexprs, warps, stages, div16, *check_spills in variants:
        # Specialised as a launch would be: fresh allocations are 16-byte aligned, and so are `div16` values.
        aligned = div16 + ([a for a in fn.arg_names if a not in constexprs and signature.get(a, "").startswith("*")]
                           if check_spills else [])
        try:
            compiled = compile_sm90(fn, signature, constexprs, aligned, warps, stages)
            if check_spills:
                regs, spilled = _ptxas_report(compiled.asm["ptx"])
                if spilled:
                    failures.append(f"{fn.__name__} {constexprs} num_warps={warps} num_stages={stages}: "
                                    f"{regs} registers, {spilled} bytes spilled")
        except Exception as e:  # report every kernel that fails, not only the first
            failures.append(f"{fn.__name__} {constexprs}: {e!r}"[:1500])
    print("\n".join(failures) or "all kernels compiled")
    return 1 if failures else 0


def _compile_in_subprocess(*args: str, timeout: int, module: str = "tests.test_kernels_compile") -> None:
    """Run `python -m module *args` compiling for sm_90 without the interpreter; fail on a non-zero exit."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the layer tests compile and run every kernel on it")
    try:
        import triton.backends
        has_nvidia = "nvidia" in triton.backends.backends
    except ImportError:
        has_nvidia = False
    if not has_nvidia:
        pytest.skip("triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "SINGA_FORCE_TRITON": "0"}
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


def test_kernels_compile_for_sm90():
    _compile_in_subprocess(timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_conv_tiles_compile_without_spills():
    # Every tile the convolution autotuner may pick, for 16-bit and fp32 operands.
    _compile_in_subprocess("--all-conv-tiles", timeout=1200)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
