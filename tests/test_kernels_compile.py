"""Every layer kernel compiles for an H100 (sm_90) on a host without a GPU.

The interpreter runs kernels as numpy code and accepts things the GPU compiler rejects (types that do not
unify, scalar masks, block shapes); compiling ahead of time through ptxas catches those here. Runs in a
subprocess because kernels are interpreted objects once TRITON_INTERPRET=1 is set (tests/conftest.py).
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
    """Convolution, pooling and LRN; arguments not named in a signature are i32 sizes and strides."""
    from triton_kernels import conv, lrn, pool

    h, f, i, b = "*fp16", "*fp32", "*i64", "*bf16"
    tile = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, PRECISION="ieee")
    out = []
    for flat in (True, False):
        out.append((conv._conv2d_fwd_kernel, dict(x_ptr=h, w_ptr=h, b_ptr=h, y_ptr=h),
                    dict(HAS_BIAS=True, RELU=True, FLAT_K=flat, **tile), 4))
        out.append((conv._conv2d_dgrad_kernel, dict(dy_ptr=h, y_ptr=h, w_ptr=h, dx_ptr=h),
                    dict(RELU=True, FLAT_K=flat, **tile), 4))
    scalars = dict(alpha="fp32", beta="fp32", k="fp32")
    return out + [
        (conv._conv2d_wgrad_kernel, dict(dy_ptr=h, y_ptr=h, x_ptr=h, dw_part_ptr=f, db_part_ptr=f),
         dict(RELU=True, HAS_BIAS=True, **tile), 4),
        (conv._sum_splits_kernel, dict(part_ptr=f, out_ptr=b), dict(BLOCK=1024), 4),
        (pool._max_pool2d_fwd_kernel, dict(x_ptr=b, y_ptr=b, idx_ptr=i), dict(BLOCK=256), 4),
        (pool._max_pool2d_bwd_kernel, dict(dy_ptr=b, idx_ptr=i, dx_ptr=b), dict(BLOCK=256), 4),
        (pool._avg_pool2d_fwd_kernel, dict(x_ptr=b, y_ptr=b), dict(COUNT_INCLUDE_PAD=False, DIVISOR=0, BLOCK=256), 4),
        (pool._avg_pool2d_bwd_kernel, dict(dy_ptr=b, dx_ptr=b), dict(COUNT_INCLUDE_PAD=True, DIVISOR=3, BLOCK=256), 4),
        (lrn._lrn_fwd_kernel, dict(x_ptr=b, y_ptr=b, scale_ptr=f, **scalars), dict(BLOCK_C=8, BLOCK_S=128), 4),
        (lrn._lrn_bwd_kernel, dict(dy_ptr=b, x_ptr=b, scale_ptr=f, dx_ptr=b, **scalars),
         dict(BLOCK_C=8, BLOCK_S=128), 4),
    ]


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


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for fn, signature, constexprs, warps in _variants():
        sig = {a: "constexpr" if a in constexprs else signature.get(a, "i32") for a in fn.arg_names}
        try:
            triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 3})
        except Exception as e:  # report every kernel that fails, not only the first
            failures.append(f"{fn.__name__} {constexprs}: {e!r}"[:1500])
    print("\n".join(failures) or "all kernels compiled")
    return 1 if failures else 0


def test_kernels_compile_for_sm90():
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
    out = subprocess.run([sys.executable, "-m", "tests.test_kernels_compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(main())
