"""The quantizers in torch: every block of a tensor at once, on CPU or CUDA, with llama.cpp's bytes.

`kquants.quantize` runs them for Q8_0 / Q5_0 / Q5_1, and for the k-quants without importance on
CUDA or on a CPU without a C compiler. Each reproduces its twin in `reference` (and so
ggml-quants.c) bit for bit. What makes that possible:
- data are laid out element-major, (weights per group, groups), so the running float32 sums
  that ggml accumulates weight by weight become one vector add per weight, in ggml's order;
- every operation is a separate float32 elementwise op (no fused multiply-add, no reductions
  whose order differs from ggml's), divisions are tensor / tensor and square roots are taken
  in float64 (torch's shortcuts for both round differently), nearest_int is the same
  magic-number trick, and C's float -> int conversions are spelled out as x86 does them;
- float32 -> float16 conversion rounds to nearest even on both devices, as ggml's does.
On CUDA the scale search runs in `native_search`'s kernels where NVRTC works (same bytes).
"""

from __future__ import annotations

import numpy as np
import torch

from shipkit.quantize import formats as fmt
from shipkit.quantize import native_search

f32 = np.float32
USE_SEARCH_KERNELS = True  # False (tests): the torch scale search even where a CUDA kernel builds


def _div(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 division. torch turns `scalar / tensor` into reciprocal-times-scalar and may
    do `tensor / scalar` as a multiplication, each a rounding away from C's division."""
    if not isinstance(numerator, torch.Tensor):
        numerator = torch.full_like(denominator, numerator)
    if not isinstance(denominator, torch.Tensor):
        denominator = torch.full_like(numerator, denominator)
    return numerator / denominator


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int on a float32 tensor -> int32 (exact, also outside its domain).

    A NaN gives 0 as on x86, whose NaNs from arithmetic all have mantissa 0x400000; a GPU's
    canonical NaN (mantissa 0x7fffff) would give 0x3fffff.
    """
    shifted = values + fmt.NEAREST_INT_MAGIC
    result = (shifted.view(torch.int32) & 0x007FFFFF) - 0x00400000
    return torch.where(torch.isnan(values), torch.zeros_like(result), result)


def _running_sum(terms: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum over `dim` one slice at a time from 0.0, the order of ggml's scalar loops."""
    slices = terms.unbind(dim)
    total = torch.zeros_like(slices[0])
    for term in slices:
        total.add_(term)
    return total


def _fp16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float16 bits as int16, their float32 value)."""
    half = values.to(torch.float16)
    return half.view(torch.int16), half.float()


def _le_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n,) int16/int32 -> (n, itemsize) uint8, little-endian."""
    return values.contiguous().view(torch.uint8).view(values.shape[0], -1)


X86_INVALID_INT = -(2**31)  # x86's float->int answer for NaN, inf and out of range values


def _c_int(values: torch.Tensor) -> torch.Tensor:
    """C's float -> int32 conversion (truncation) as on x86, where ggml runs: CUDA would
    saturate inf and give 0 for NaN, so values that do not fit are set explicitly."""
    fits = torch.isfinite(values) & (values.abs() < 2.0**31)
    return torch.where(fits, values, torch.full_like(values, X86_INVALID_INT)).to(torch.int32)


def _round_away(values: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero, exact for every float32."""
    whole = torch.trunc(values)
    carry = ((values - whole).abs() >= 0.5).to(values.dtype) * torch.sign(values)
    return whole + carry


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 32) float32 -> (nb, 34) uint8."""
    amax = blocks.abs().amax(dim=1)
    d = _div(amax, 127.0)
    inverse = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    levels = _c_int(_round_away(blocks * inverse[:, None])).to(torch.int8)
    d_bits, _ = _fp16(d)
    return torch.cat([_le_bytes(d_bits), levels.view(torch.uint8)], dim=1)


def _pack_q5(levels: torch.Tensor) -> torch.Tensor:
    """(nb, 32) int32 levels 0..31 -> qh (4 bytes) + qs (16 bytes)."""
    shifts = torch.arange(32, device=levels.device, dtype=torch.int64)
    high = (((levels >> 4) & 1).to(torch.int64) << shifts).sum(dim=1).to(torch.int32)
    low = (levels[:, :16] & 0xF) | ((levels[:, 16:] & 0xF) << 4)
    return torch.cat([_le_bytes(high), low.to(torch.uint8)], dim=1)


def quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 32) float32 -> (nb, 22) uint8."""
    index = blocks.abs().argmax(dim=1, keepdim=True)  # the first largest |x|, as ggml's strict >
    signed_max = blocks.gather(1, index)[:, 0]
    # ggml's running max starts at +0.0, which no zero replaces: a block of zeros keeps +0.0.
    signed_max = torch.where(signed_max != 0, signed_max, torch.zeros_like(signed_max))
    d = _div(signed_max, -16.0)
    inverse = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    levels = _c_int(blocks * inverse[:, None] + 16.5).clamp_(max=31)
    d_bits, _ = _fp16(d)
    return torch.cat([_le_bytes(d_bits), _pack_q5(levels)], dim=1)


def quantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 32) float32 -> (nb, 24) uint8."""
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    # ggml keeps the first of equal extremes; for a zero extreme that is the first zero, whose
    # sign reaches m (amin/amax may return either zero).
    first_zero = blocks.gather(1, (blocks == 0).to(torch.uint8).argmax(dim=1, keepdim=True))[:, 0]
    lo = torch.where(lo == 0, first_zero, lo)
    hi = torch.where(hi == 0, first_zero, hi)
    d = _div(hi - lo, 31.0)
    inverse = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    levels = _c_int((blocks - lo[:, None]) * inverse[:, None] + 0.5) & 0xFF
    d_bits, _ = _fp16(d)
    m_bits, _ = _fp16(lo)
    return torch.cat([_le_bytes(d_bits), _le_bytes(m_bits), _pack_q5(levels)], dim=1)


def _finite_or_zero(iscale: torch.Tensor) -> torch.Tensor:
    """An iscale that overflowed (a group spanning only denormals) makes ggml's nearest_int
    return 0 for every weight; a zero iscale gives the same levels through round()."""
    return torch.where(torch.isfinite(iscale), iscale, torch.zeros_like(iscale))


def _rint(values: torch.Tensor) -> torch.Tensor:
    """Round half to even in place, exactly as nearest_int for |values| < 2**22; NaN and
    +-inf become 0, which every caller's clamp turns into what ggml's nearest_int gives."""
    values.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return values.add_(fmt.NEAREST_INT_MAGIC).sub_(fmt.NEAREST_INT_MAGIC)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, search: fmt.SearchParams
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised make_qkx2_quants over groups: x, weights (n, groups) -> scale, -min, levels.

    As in ggml, an accepted candidate's min shifts every later candidate, so the search
    tracks the current min per group and remembers the (iscale, min) that produced the best
    levels, which are rebuilt once at the end with the very same float ops. Levels stay in
    [0, 16*nmax/15] before clamping, where the magic-number rounding is exact.
    """
    nmax = search.nmax
    lo, hi = x[0].clone(), x[0].clone()
    sum_w = weights[0].clone()
    sum_x = sum_w * x[0]
    for x_i, w_i in zip(x.unbind(0)[1:], weights.unbind(0)[1:]):
        lo = torch.where(x_i < lo, x_i, lo)
        hi = torch.where(x_i > hi, x_i, hi)
        sum_w += w_i
        sum_x += w_i * x_i
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo

    iscale = _div(float(nmax), hi - lo)
    scale = _div(1.0, iscale)
    iscale = _finite_or_zero(iscale)
    levels = _rint(iscale * (x - lo)).clamp_(0, nmax)
    diff = (scale * levels).add_(lo).sub_(x)
    best_error = _running_sum(diff.mul_(diff).mul_(weights))
    best_iscale, best_shift = iscale, lo
    products = torch.empty((3, *x.shape), dtype=x.dtype, device=x.device)  # w*l, w*l*l, w*l*x
    for step in range(search.nstep + 1):
        numerator = f32(search.rmin) + f32(search.rdelta) * f32(step) + f32(nmax)
        iscale = _finite_or_zero(_div(float(numerator), hi - lo))
        trial = _rint((x - lo).mul_(iscale)).clamp_(0, nmax)
        torch.mul(weights, trial, out=products[0])
        torch.mul(products[0], trial, out=products[1])
        torch.mul(products[0], x, out=products[2])
        sum_l, sum_l2, sum_xl = _running_sum(products, dim=1)  # one pass for the three sums
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        diff = trial.mul_(this_scale).add_(this_min).sub_(x)
        error = _running_sum(diff.mul_(diff).mul_(weights))
        better = (det > 0) & (error < best_error)
        best_error = torch.where(better, error, best_error)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_shift = torch.where(better, lo, best_shift)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    levels = _rint((x - best_shift).mul_(best_iscale)).clamp_(0, nmax)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -lo, levels


def _pack_scales_mins(q_scales: torch.Tensor, q_mins: torch.Tensor) -> torch.Tensor:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) uint8 (get_scale_min_k4 layout)."""
    low_s, high_s = q_scales[:, :4], q_scales[:, 4:]
    low_m, high_m = q_mins[:, :4], q_mins[:, 4:]
    first = low_s | ((high_s >> 4) << 6)
    second = low_m | ((high_m >> 4) << 6)
    third = (high_s & 0xF) | ((high_m & 0xF) << 4)
    return torch.cat([first, second, third], dim=1).to(torch.uint8)


def _use_kernels(x: torch.Tensor) -> bool:
    """The CUDA search kernels (same bytes, many times faster) where they can be built."""
    return USE_SEARCH_KERNELS and native_search.available(x.device)


def _positive_max(values: torch.Tensor) -> torch.Tensor:
    """Row max if positive, else +0.0 (ggml starts from 0 and keeps it unless a value is > 0)."""
    top = values.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _kquant_levels(blocks: torch.Tensor, search: fmt.SearchParams):
    """Front half of Q4_K / Q5_K: (nb, 256) -> d bits, dmin bits, 6-bit scales, mins, levels."""
    nb = blocks.shape[0]
    x = blocks.reshape(-1, 32).T.contiguous()  # (32, groups): weight-major
    # torch's CPU float32 sqrt can be 1 ulp off; sqrt in float64 rounded once is exact.
    av_x = torch.sqrt(_div(_running_sum(x * x), 32.0).double()).float()
    weights = av_x + x.abs()
    search_fn = native_search.make_qkx2_quants if _use_kernels(x) else make_qkx2_quants
    scales, mins, levels = search_fn(x, weights, search)
    scales, mins = scales.view(nb, 8), mins.view(nb, 8)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _div(63.0, max_min), torch.zeros_like(max_min))
    q_scales = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    q_mins = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d_bits, d_all = _fp16(_div(max_scale, 63.0))
    dmin_bits, dmin_all = _fp16(_div(max_min, 63.0))
    d = (d_all[:, None] * q_scales.float()).reshape(1, -1)
    dm = (dmin_all[:, None] * q_mins.float()).reshape(1, -1)
    final = nearest_int((x + dm) / d).clamp_(0, search.nmax)
    levels = torch.where(d != 0, final, _c_int(levels))
    levels = levels.T.reshape(nb, fmt.QK_K)
    return d_bits, dmin_bits, q_scales, q_mins, levels


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 256) float32 -> (nb, 144) uint8."""
    d_bits, dmin_bits, q_scales, q_mins, levels = _kquant_levels(blocks, fmt.Q4_K_SEARCH)
    pairs = levels.view(-1, 4, 2, 32)  # 64-weight chunks: low nibble, high nibble
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([_le_bytes(d_bits), _le_bytes(dmin_bits),
                      _pack_scales_mins(q_scales, q_mins), qs], dim=1)


def quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 256) float32 -> (nb, 176) uint8."""
    d_bits, dmin_bits, q_scales, q_mins, levels = _kquant_levels(blocks, fmt.Q5_K_SEARCH)
    pairs = levels.view(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128).to(torch.uint8)
    bit_of = torch.arange(8, device=blocks.device, dtype=torch.int32).view(1, 4, 2, 1)
    qh = (((pairs >> 4) & 1) << bit_of).sum(dim=(1, 2)).to(torch.uint8)
    return torch.cat([_le_bytes(d_bits), _le_bytes(dmin_bits),
                      _pack_scales_mins(q_scales, q_mins), qh, qs], dim=1)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised make_qx_quants (rmse_type 1): x (n, groups) -> scale, levels 0..2*nmax-1."""
    amax = torch.zeros_like(x[0])
    signed_max = torch.zeros_like(x[0])
    for row in x:
        larger = row.abs() > amax
        amax = torch.where(larger, row.abs(), amax)
        signed_max = torch.where(larger, row, signed_max)
    empty = amax < fmt.GROUP_MAX_EPS
    weight_x = x * x * x
    weight = x * x

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        level = _rint(iscale * x).clamp_(-nmax, nmax - 1)
        return _running_sum(weight_x * level), _running_sum(weight * level * level)

    best_iscale = _div(float(-nmax), signed_max)
    sum_lx, sum_l2 = sums(best_iscale)
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in fmt.Q6_K_TRIES:
        iscale = _div(float(-(f32(nmax) + f32(0.1) * f32(step))), signed_max)
        sum_lx, sum_l2 = sums(iscale)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    levels = _rint(best_iscale * x).clamp_(-nmax, nmax - 1) + nmax
    levels = torch.where(empty, torch.zeros_like(levels), levels)
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    return scale, levels


def quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 256) float32 -> (nb, 210) uint8."""
    nb = blocks.shape[0]
    x = blocks.reshape(-1, 16).T.contiguous()  # (16, groups)
    search_fn = native_search.make_qx_quants if _use_kernels(x) else make_qx_quants
    scales, levels = search_fn(x, fmt.Q6_K_NMAX)
    scales = scales.view(nb, 16)
    max_abs = torch.zeros_like(scales[:, 0])
    max_scale = torch.zeros_like(scales[:, 0])
    for column in scales.T:
        larger = column.abs() > max_abs
        max_abs = torch.where(larger, column.abs(), max_abs)
        max_scale = torch.where(larger, column, max_scale)
    empty = max_abs < fmt.GROUP_MAX_EPS
    iscale = _div(-128.0, max_scale)
    d_bits, d_all = _fp16(_div(1.0, iscale))
    q_scales = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    d = (d_all[:, None] * q_scales.float()).reshape(1, -1)
    final = nearest_int(x / d).clamp_(-32, 31) + 32
    levels = torch.where(d != 0, final, _c_int(levels)).T.reshape(nb, 2, 4, 32)
    nibbles = levels & 0xF
    ql = torch.cat([nibbles[:, :, 0] | (nibbles[:, :, 2] << 4),
                    nibbles[:, :, 1] | (nibbles[:, :, 3] << 4)], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.int32).view(1, 1, 4, 1)
    qh = ((levels >> 4) << shifts).sum(dim=2)
    packed = torch.cat([ql.reshape(nb, 128).to(torch.uint8), qh.reshape(nb, 64).to(torch.uint8),
                        q_scales.to(torch.int8).view(torch.uint8), _le_bytes(d_bits)], dim=1)
    return torch.where(empty[:, None], torch.zeros_like(packed), packed)


BLOCK_QUANTIZERS = {
    fmt.QType.Q8_0: quantize_q8_0,
    fmt.QType.Q5_0: quantize_q5_0,
    fmt.QType.Q5_1: quantize_q5_1,
    fmt.QType.Q4_K: quantize_q4_k,
    fmt.QType.Q5_K: quantize_q5_k,
    fmt.QType.Q6_K: quantize_q6_k,
}
