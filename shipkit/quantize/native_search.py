"""The two scale searches as compiled kernels: one group of weights per CUDA thread, or 16
groups side by side per loop turn in C (gcc vectorises across the groups).

The torch versions in `kquants` make ~20 passes over the data per candidate scale; these keep
a group in registers. One C source serves both targets: NVRTC compiles it for CUDA (through
torch), the system C compiler (`$CC`, default `cc`) for the CPU. Both follow ggml-quants.c's
scalar code in float32 with each operation rounded on its own (CUDA: `__fmul_rn`, ... which are
never fused into FMAs; C: `-ffp-contract=off`, no fast-math), so the bytes equal the torch path's
and llama.cpp's. Data are weight-major, (weights per group, groups): neighbouring groups are
neighbouring floats. Without NVRTC or a C compiler the torch path runs instead (same bytes,
slower); `backend(device)` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from shipkit.quantize import formats as fmt

THREADS_PER_BLOCK = 128
NVRTC_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
C_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
CACHE_DIR = Path(os.environ.get("SHIPKIT_CACHE", Path.home() / ".cache" / "shipkit"))

_GROUP_SOURCE = r"""
#ifdef __CUDACC_RTC__
#define LANES 1
#define FN __device__ __forceinline__
#define MUL(a, b) __fmul_rn(a, b)
#define ADD(a, b) __fadd_rn(a, b)
#define SUB(a, b) __fsub_rn(a, b)
#define DIV(a, b) __fdiv_rn(a, b)
#else
#include <math.h>
#define LANES 16
#define FN static inline
#define MUL(a, b) ((a) * (b))
#define ADD(a, b) ((a) + (b))
#define SUB(a, b) ((a) - (b))
#define DIV(a, b) ((a) / (b))
#endif
#define LANE for (int k = 0; k < LANES; ++k)
/* Two plain selects (not one nested ?:) so that gcc if-converts and vectorises the loops. */
FN int clamp_int(int value, int lo, int hi) {
    value = value < lo ? lo : value;
    return value > hi ? hi : value;
}
#define CLAMP(v, lo, hi) clamp_int(v, lo, hi)

/* ggml's nearest_int: add 1.5 * 2^23 and read the low mantissa bits. Inside the searches
   |value| < 2^22 or value is not finite, and then (on x86) subtracting the constant again and
   converting gives the same integer, or 0x80000000, which every caller clamps as ggml's 0 is
   clamped; unlike the bit trick, that form vectorises. CUDA keeps the bit trick. */
#ifdef __CUDACC_RTC__
FN int nearest_int(float value) {  /* NaN: 0, as x86's NaNs give (see kquants.nearest_int) */
    return isnan(value) ? 0 : (__float_as_int(ADD(value, 12582912.0f)) & 0x007fffff) - 0x00400000;
}
#else
FN int nearest_int(float value) {
    return (int)SUB(ADD(value, 12582912.0f), 12582912.0f);
}
#endif

/* ggml's make_qkx2_quants on LANES groups of 32 side by side: weight i of group k is
   x[i * stride + k]. Every lane takes every branch; a select keeps what ggml would. */
FN void qkx2_groups(const float* x, const float* weights, long stride, float* scale_out,
                    float* min_out, float* levels_out, int nmax, float rmin, float rdelta, int nstep) {
    float xs[32][LANES], ws[32][LANES], levels[32][LANES], trial[32][LANES];
    float lo[LANES], hi[LANES], first_lo[LANES], sum_w[LANES], sum_x[LANES], iscale[LANES];
    float scale[LANES], best_error[LANES], sum_l[LANES], sum_l2[LANES], sum_xl[LANES];
    float det[LANES], this_scale[LANES], this_min[LANES], error[LANES];
    int better[LANES];
    for (int i = 0; i < 32; ++i) LANE { xs[i][k] = x[i * stride + k]; ws[i][k] = weights[i * stride + k]; }
    LANE { lo[k] = xs[0][k]; hi[k] = xs[0][k]; sum_w[k] = ws[0][k]; sum_x[k] = MUL(ws[0][k], xs[0][k]); }
    for (int i = 1; i < 32; ++i) LANE {
        lo[k] = xs[i][k] < lo[k] ? xs[i][k] : lo[k];
        hi[k] = xs[i][k] > hi[k] ? xs[i][k] : hi[k];
        sum_w[k] = ADD(sum_w[k], ws[i][k]);
        sum_x[k] = ADD(sum_x[k], MUL(ws[i][k], xs[i][k]));
    }
    LANE {
        lo[k] = lo[k] > 0 ? 0.0f : lo[k];
        first_lo[k] = lo[k];
        iscale[k] = DIV((float)nmax, SUB(hi[k], lo[k]));
        scale[k] = DIV(1.0f, iscale[k]);
        best_error[k] = 0;
    }
    for (int i = 0; i < 32; ++i) LANE {
        int l = nearest_int(MUL(iscale[k], SUB(xs[i][k], lo[k])));
        levels[i][k] = (float)CLAMP(l, 0, nmax);
        float diff = SUB(ADD(MUL(scale[k], levels[i][k]), lo[k]), xs[i][k]);
        best_error[k] = ADD(best_error[k], MUL(ws[i][k], MUL(diff, diff)));
    }
    for (int step = 0; step <= nstep; ++step) {
        float numerator = ADD(ADD(rmin, MUL(rdelta, (float)step)), (float)nmax);
        LANE { iscale[k] = DIV(numerator, SUB(hi[k], lo[k])); sum_l[k] = 0; sum_l2[k] = 0; sum_xl[k] = 0; }
        for (int i = 0; i < 32; ++i) LANE {
            int l = nearest_int(MUL(iscale[k], SUB(xs[i][k], lo[k])));
            trial[i][k] = (float)CLAMP(l, 0, nmax);
            float weighted = MUL(ws[i][k], trial[i][k]);
            sum_l[k] = ADD(sum_l[k], weighted);
            sum_l2[k] = ADD(sum_l2[k], MUL(weighted, trial[i][k]));
            sum_xl[k] = ADD(sum_xl[k], MUL(weighted, xs[i][k]));
        }
        LANE {
            det[k] = SUB(MUL(sum_w[k], sum_l2[k]), MUL(sum_l[k], sum_l[k]));
            float fitted_scale = DIV(SUB(MUL(sum_w[k], sum_xl[k]), MUL(sum_x[k], sum_l[k])), det[k]);
            float fitted_min = DIV(SUB(MUL(sum_l2[k], sum_x[k]), MUL(sum_l[k], sum_xl[k])), det[k]);
            this_scale[k] = fitted_min > 0 ? DIV(sum_xl[k], sum_l2[k]) : fitted_scale;
            this_min[k] = fitted_min > 0 ? 0.0f : fitted_min;
            error[k] = 0;
        }
        for (int i = 0; i < 32; ++i) LANE {
            float diff = SUB(ADD(MUL(this_scale[k], trial[i][k]), this_min[k]), xs[i][k]);
            error[k] = ADD(error[k], MUL(ws[i][k], MUL(diff, diff)));
        }
        LANE {
            better[k] = det[k] > 0 && error[k] < best_error[k];
            best_error[k] = better[k] ? error[k] : best_error[k];
            scale[k] = better[k] ? this_scale[k] : scale[k];
            lo[k] = better[k] ? this_min[k] : lo[k];
        }
        for (int i = 0; i < 32; ++i) LANE { levels[i][k] = better[k] ? trial[i][k] : levels[i][k]; }
    }
    LANE {
        int flat = hi[k] == first_lo[k];
        scale_out[k] = flat ? 0.0f : scale[k];
        min_out[k] = flat ? -first_lo[k] : -lo[k];
        for (int i = 0; i < 32; ++i) levels_out[i * stride + k] = flat ? 0.0f : levels[i][k];
    }
}

/* ggml's make_qx_quants (rmse_type 1, no weights) on LANES groups of 16 side by side. */
FN void qx_groups(const float* x, long stride, float* scale_out, float* levels_out, int nmax) {
    float xs[16][LANES], levels[16][LANES], trial[16][LANES];
    float amax[LANES], signed_max[LANES], iscale[LANES], sum_lx[LANES], sum_l2[LANES];
    float scale[LANES], best[LANES];
    for (int i = 0; i < 16; ++i) LANE { xs[i][k] = x[i * stride + k]; }
    LANE { amax[k] = 0; signed_max[k] = 0; }
    for (int i = 0; i < 16; ++i) LANE {
        float ax = fabsf(xs[i][k]);
        signed_max[k] = ax > amax[k] ? xs[i][k] : signed_max[k];
        amax[k] = ax > amax[k] ? ax : amax[k];
    }
    LANE { iscale[k] = DIV((float)(-nmax), signed_max[k]); sum_lx[k] = 0; sum_l2[k] = 0; }
    for (int i = 0; i < 16; ++i) LANE {
        int l = nearest_int(MUL(iscale[k], xs[i][k]));
        levels[i][k] = (float)CLAMP(l, -nmax, nmax - 1);
        float w = MUL(xs[i][k], xs[i][k]);
        sum_lx[k] = ADD(sum_lx[k], MUL(MUL(w, xs[i][k]), levels[i][k]));
        sum_l2[k] = ADD(sum_l2[k], MUL(MUL(w, levels[i][k]), levels[i][k]));
    }
    LANE {
        scale[k] = sum_l2[k] != 0 ? DIV(sum_lx[k], sum_l2[k]) : 0.0f;
        best[k] = MUL(scale[k], sum_lx[k]);
    }
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        float numerator = -ADD((float)nmax, MUL(0.1f, (float)step));
        LANE { iscale[k] = DIV(numerator, signed_max[k]); sum_lx[k] = 0; sum_l2[k] = 0; }
        for (int i = 0; i < 16; ++i) LANE {
            int l = nearest_int(MUL(iscale[k], xs[i][k]));
            trial[i][k] = (float)CLAMP(l, -nmax, nmax - 1);
            float w = MUL(xs[i][k], xs[i][k]);
            sum_lx[k] = ADD(sum_lx[k], MUL(MUL(w, xs[i][k]), trial[i][k]));
            sum_l2[k] = ADD(sum_l2[k], MUL(MUL(w, trial[i][k]), trial[i][k]));
        }
        LANE {
            int better = sum_l2[k] > 0 && MUL(sum_lx[k], sum_lx[k]) > MUL(best[k], sum_l2[k]);
            scale[k] = better ? DIV(sum_lx[k], sum_l2[k]) : scale[k];
            best[k] = better ? MUL(scale[k], sum_lx[k]) : best[k];
            for (int i = 0; i < 16; ++i) levels[i][k] = better ? trial[i][k] : levels[i][k];
        }
    }
    LANE {
        int empty = amax[k] < 1e-15f;
        scale_out[k] = empty ? 0.0f : scale[k];
        for (int i = 0; i < 16; ++i) levels_out[i * stride + k] = empty ? 0.0f : levels[i][k] + nmax;
    }
}
"""

_CUDA_SOURCE = _GROUP_SOURCE + r"""
extern "C" __global__ void make_qkx2_quants(
        const float* x, const float* weights, float* scale_out, float* min_out, float* levels_out,
        int groups, int nmax, double rmin, double rdelta, int nstep) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g < groups)
        qkx2_groups(x + g, weights + g, groups, scale_out + g, min_out + g, levels_out + g,
                    nmax, (float)rmin, (float)rdelta, nstep);
}

extern "C" __global__ void make_qx_quants(
        const float* x, float* scale_out, float* levels_out, int groups, int nmax) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g < groups) qx_groups(x + g, groups, scale_out + g, levels_out + g, nmax);
}
"""

# groups must be a multiple of LANES (16: two AVX2 vectors; fastest measured): the caller pads.
_C_SOURCE = _GROUP_SOURCE + r"""
void make_qkx2_quants(const float* x, const float* weights, float* scale_out, float* min_out,
                      float* levels_out, long groups, int nmax, float rmin, float rdelta, int nstep) {
    for (long g = 0; g < groups; g += LANES)
        qkx2_groups(x + g, weights + g, groups, scale_out + g, min_out + g, levels_out + g,
                    nmax, rmin, rdelta, nstep);
}

void make_qx_quants(const float* x, float* scale_out, float* levels_out, long groups, int nmax) {
    for (long g = 0; g < groups; g += LANES) qx_groups(x + g, groups, scale_out + g, levels_out + g, nmax);
}
"""
C_LANES = 16

def backend(device: torch.device | str) -> str:
    """"cuda-kernel", "c-kernel" or "torch": what runs the scale search on `device`."""
    if torch.device(device).type == "cuda":
        return "cuda-kernel" if _cuda_kernels() is not None else "torch"
    return "c-kernel" if _c_library() is not None else "torch"


@functools.cache
def _cuda_kernels() -> dict | None:
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")):
        return None
    try:
        return {name: torch.cuda._compile_kernel(_CUDA_SOURCE, name, nvcc_options=list(NVRTC_OPTIONS))
                for name in ("make_qkx2_quants", "make_qx_quants")}
    except (RuntimeError, OSError):  # no NVRTC library: the torch search gives the same bytes
        return None


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """Compile the C source once into the cache folder (keyed by its hash) and load it.

    x86-64 only: its nearest_int leans on x86's float -> int conversion of inf and NaN."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    # -march=native: the key holds the machine too, should the cache folder be shared.
    key = _C_SOURCE + " ".join(C_FLAGS) + platform.node() + platform.machine()
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    library = CACHE_DIR / f"quant-search-{digest}.so"
    if not library.exists():
        try:
            _compile(library)
        except (OSError, subprocess.SubprocessError):  # no compiler or no writable cache
            return None
    loaded = ctypes.CDLL(str(library))
    pointer, long_, int_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    loaded.make_qkx2_quants.argtypes = [pointer] * 5 + [long_, int_, float_, float_, int_]
    loaded.make_qx_quants.argtypes = [pointer] * 3 + [long_, int_]
    return loaded


def _compile(library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as build:
        source, output = Path(build) / "search.c", Path(build) / "search.so"
        source.write_text(_C_SOURCE)
        command = [os.environ.get("CC", "cc"), *C_FLAGS, "-o", str(output), str(source)]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(output, library)


def available(device: torch.device | str) -> bool:
    return backend(device) != "torch"


def _pad_lanes(values: torch.Tensor) -> torch.Tensor:
    """(n, groups) -> (n, groups rounded up to C_LANES), padded with zero groups."""
    missing = -values.shape[1] % C_LANES
    return torch.nn.functional.pad(values, (0, missing)) if missing else values


def _grid(groups: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return ((groups + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK, 1, 1), (THREADS_PER_BLOCK, 1, 1)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, search: fmt.SearchParams
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of kquants.make_qkx2_quants: x, weights (32, groups) -> scale, -min, levels."""
    x, weights = x.contiguous(), weights.contiguous()
    groups = x.shape[1]
    scale, the_min, levels = x.new_empty(groups), x.new_empty(groups), torch.empty_like(x)
    if x.is_cuda:
        grid, block = _grid(groups)
        _cuda_kernels()["make_qkx2_quants"](
            grid=grid, block=block,
            args=[x, weights, scale, the_min, levels, groups, search.nmax, float(search.rmin),
                  float(search.rdelta), search.nstep])
    else:
        x, weights = _pad_lanes(x), _pad_lanes(weights)
        padded = x.shape[1]
        scale, the_min, levels = x.new_empty(padded), x.new_empty(padded), torch.empty_like(x)
        _c_library().make_qkx2_quants(
            x.data_ptr(), weights.data_ptr(), scale.data_ptr(), the_min.data_ptr(),
            levels.data_ptr(), padded, search.nmax, search.rmin, search.rdelta, search.nstep)
        scale, the_min, levels = scale[:groups], the_min[:groups], levels[:, :groups]
    return scale, the_min, levels


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of kquants.make_qx_quants: x (16, groups) -> scale, levels 0..2*nmax-1."""
    x = x.contiguous()
    groups = x.shape[1]
    scale, levels = x.new_empty(groups), torch.empty_like(x)
    if x.is_cuda:
        grid, block = _grid(groups)
        _cuda_kernels()["make_qx_quants"](grid=grid, block=block,
                                          args=[x, scale, levels, groups, nmax])
    else:
        x = _pad_lanes(x)
        scale, levels = x.new_empty(x.shape[1]), torch.empty_like(x)
        _c_library().make_qx_quants(x.data_ptr(), scale.data_ptr(), levels.data_ptr(), x.shape[1], nmax)
        scale, levels = scale[:groups], levels[:, :groups]
    return scale, levels
