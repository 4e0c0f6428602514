"""The two scale searches of `torch_quants` as CUDA kernels: one group of weights per thread.

The torch versions make ~20 passes over the data per candidate scale; these keep a group in
registers. NVRTC compiles the source (through torch) with float32 intrinsics that are each
rounded on their own and never fused into FMAs (`__fmul_rn`, ...), following ggml-quants.c's
scalar code, so the bytes equal the torch path's and llama.cpp's. Data are weight-major,
(weights per group, groups): neighbouring groups are neighbouring floats. Without NVRTC the
torch search runs instead (same bytes, slower); `backend(device)` says which one runs. On the
CPU the k-quants run in `kquant_rows`' C, whole rows at a time.
"""

from __future__ import annotations

import functools

import torch

from shipkit.quantize import formats as fmt

THREADS_PER_BLOCK = 128
NVRTC_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")

_CUDA_SOURCE = r"""
#define MUL(a, b) __fmul_rn(a, b)
#define ADD(a, b) __fadd_rn(a, b)
#define SUB(a, b) __fsub_rn(a, b)
#define DIV(a, b) __fdiv_rn(a, b)

__device__ __forceinline__ int clamp_int(int value, int lo, int hi) {
    return value < lo ? lo : (value > hi ? hi : value);
}

/* ggml's nearest_int: add 1.5 * 2^23 and read the low mantissa bits. NaN: 0, as x86's NaNs
   give (see torch_quants.nearest_int). */
__device__ __forceinline__ int nearest_int(float value) {
    return isnan(value) ? 0 : (__float_as_int(ADD(value, 12582912.0f)) & 0x007fffff) - 0x00400000;
}

/* ggml's make_qkx2_quants on one group of 32: weight i is x[i * stride]. */
extern "C" __global__ void make_qkx2_quants(
        const float* x, const float* weights, float* scale_out, float* min_out, float* levels_out,
        int groups, int nmax, double rmin_arg, double rdelta_arg, int nstep) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const float rmin = (float)rmin_arg, rdelta = (float)rdelta_arg;
    float xs[32], ws[32], levels[32], trial[32];
    for (int i = 0; i < 32; ++i) { xs[i] = x[i * groups + g]; ws[i] = weights[i * groups + g]; }
    float lo = xs[0], hi = xs[0], sum_w = ws[0], sum_x = MUL(ws[0], xs[0]);
    for (int i = 1; i < 32; ++i) {
        lo = xs[i] < lo ? xs[i] : lo;
        hi = xs[i] > hi ? xs[i] : hi;
        sum_w = ADD(sum_w, ws[i]);
        sum_x = ADD(sum_x, MUL(ws[i], xs[i]));
    }
    lo = lo > 0 ? 0.0f : lo;
    const float first_lo = lo;
    float iscale = DIV((float)nmax, SUB(hi, lo));
    float scale = DIV(1.0f, iscale);
    float best_error = 0;
    for (int i = 0; i < 32; ++i) {
        levels[i] = (float)clamp_int(nearest_int(MUL(iscale, SUB(xs[i], lo))), 0, nmax);
        const float diff = SUB(ADD(MUL(scale, levels[i]), lo), xs[i]);
        best_error = ADD(best_error, MUL(ws[i], MUL(diff, diff)));
    }
    for (int step = 0; step <= nstep; ++step) {
        iscale = DIV(ADD(ADD(rmin, MUL(rdelta, (float)step)), (float)nmax), SUB(hi, lo));
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < 32; ++i) {
            trial[i] = (float)clamp_int(nearest_int(MUL(iscale, SUB(xs[i], lo))), 0, nmax);
            const float weighted = MUL(ws[i], trial[i]);
            sum_l = ADD(sum_l, weighted);
            sum_l2 = ADD(sum_l2, MUL(weighted, trial[i]));
            sum_xl = ADD(sum_xl, MUL(weighted, xs[i]));
        }
        const float det = SUB(MUL(sum_w, sum_l2), MUL(sum_l, sum_l));
        if (!(det > 0)) continue;
        float this_scale = DIV(SUB(MUL(sum_w, sum_xl), MUL(sum_x, sum_l)), det);
        float this_min = DIV(SUB(MUL(sum_l2, sum_x), MUL(sum_l, sum_xl)), det);
        if (this_min > 0) {
            this_min = 0.0f;
            this_scale = DIV(sum_xl, sum_l2);
        }
        float error = 0;
        for (int i = 0; i < 32; ++i) {
            const float diff = SUB(ADD(MUL(this_scale, trial[i]), this_min), xs[i]);
            error = ADD(error, MUL(ws[i], MUL(diff, diff)));
        }
        if (error < best_error) {
            best_error = error;
            scale = this_scale;
            lo = this_min;
            for (int i = 0; i < 32; ++i) levels[i] = trial[i];
        }
    }
    const int flat = hi == first_lo;
    scale_out[g] = flat ? 0.0f : scale;
    min_out[g] = flat ? -first_lo : -lo;
    for (int i = 0; i < 32; ++i) levels_out[i * groups + g] = flat ? 0.0f : levels[i];
}

/* ggml's make_qx_quants (rmse_type 1, no weights) on one group of 16: weight i is x[i * stride]. */
extern "C" __global__ void make_qx_quants(
        const float* x, float* scale_out, float* levels_out, int groups, int nmax) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    float xs[16], levels[16], trial[16];
    float amax = 0, signed_max = 0;
    for (int i = 0; i < 16; ++i) {
        xs[i] = x[i * groups + g];
        const float ax = fabsf(xs[i]);
        signed_max = ax > amax ? xs[i] : signed_max;
        amax = ax > amax ? ax : amax;
    }
    float iscale = DIV((float)(-nmax), signed_max), sum_lx = 0, sum_l2 = 0;
    for (int i = 0; i < 16; ++i) {
        levels[i] = (float)clamp_int(nearest_int(MUL(iscale, xs[i])), -nmax, nmax - 1);
        const float w = MUL(xs[i], xs[i]);
        sum_lx = ADD(sum_lx, MUL(MUL(w, xs[i]), levels[i]));
        sum_l2 = ADD(sum_l2, MUL(MUL(w, levels[i]), levels[i]));
    }
    float scale = sum_l2 != 0 ? DIV(sum_lx, sum_l2) : 0.0f;
    float best = MUL(scale, sum_lx);
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        iscale = DIV(-ADD((float)nmax, MUL(0.1f, (float)step)), signed_max);
        sum_lx = 0;
        sum_l2 = 0;
        for (int i = 0; i < 16; ++i) {
            trial[i] = (float)clamp_int(nearest_int(MUL(iscale, xs[i])), -nmax, nmax - 1);
            const float w = MUL(xs[i], xs[i]);
            sum_lx = ADD(sum_lx, MUL(MUL(w, xs[i]), trial[i]));
            sum_l2 = ADD(sum_l2, MUL(MUL(w, trial[i]), trial[i]));
        }
        if (sum_l2 > 0 && MUL(sum_lx, sum_lx) > MUL(best, sum_l2)) {
            scale = DIV(sum_lx, sum_l2);
            best = MUL(scale, sum_lx);
            for (int i = 0; i < 16; ++i) levels[i] = trial[i];
        }
    }
    const int empty = amax < 1e-15f;
    scale_out[g] = empty ? 0.0f : scale;
    for (int i = 0; i < 16; ++i) levels_out[i * groups + g] = empty ? 0.0f : levels[i] + nmax;
}
"""


def backend(device: torch.device | str) -> str:
    """"cuda-kernel" or "torch": what runs the torch quantizers' scale search on `device`."""
    if torch.device(device).type == "cuda" and _cuda_kernels() is not None:
        return "cuda-kernel"
    return "torch"


@functools.cache
def _cuda_kernels() -> dict | None:
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")):
        return None
    try:
        return {name: torch.cuda._compile_kernel(_CUDA_SOURCE, name, nvcc_options=list(NVRTC_OPTIONS))
                for name in ("make_qkx2_quants", "make_qx_quants")}
    except (RuntimeError, OSError):  # no NVRTC library: the torch search gives the same bytes
        return None


def available(device: torch.device | str) -> bool:
    return backend(device) != "torch"


def _grid(groups: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return ((groups + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK, 1, 1), (THREADS_PER_BLOCK, 1, 1)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, search: fmt.SearchParams
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of torch_quants.make_qkx2_quants on CUDA: x, weights (32, groups) -> scale, -min, levels."""
    x, weights = x.contiguous(), weights.contiguous()
    groups = x.shape[1]
    scale, the_min, levels = x.new_empty(groups), x.new_empty(groups), torch.empty_like(x)
    grid, block = _grid(groups)
    _cuda_kernels()["make_qkx2_quants"](
        grid=grid, block=block,
        args=[x, weights, scale, the_min, levels, groups, search.nmax, float(search.rmin),
              float(search.rdelta), search.nstep])
    return scale, the_min, levels


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of torch_quants.make_qx_quants on CUDA: x (16, groups) -> scale, levels 0..2*nmax-1."""
    x = x.contiguous()
    groups = x.shape[1]
    scale, levels = x.new_empty(groups), torch.empty_like(x)
    grid, block = _grid(groups)
    _cuda_kernels()["make_qx_quants"](grid=grid, block=block, args=[x, scale, levels, groups, nmax])
    return scale, levels
