"""Plain per-block quantizers: one function a format, a scalar float32 loop per weight.

They mirror the reference quantizers of llama.cpp's ggml-quants.c (no importance matrix)
operation by operation in float32, so they are slow and exact: the vectorised quantizers in
`torch_quants` are tested against them, and they against llama.cpp itself. Each takes a 1-D
float32 array (a whole number of blocks) and returns the encoded bytes.
"""

from __future__ import annotations

import numpy as np

from shipkit.quantize import formats as fmt

f32 = np.float32


def nearest_int(value: np.float32) -> int:
    """ggml's nearest_int: add 1.5*2**23 in float32 and read the low mantissa bits."""
    shifted = np.array(f32(value) + f32(fmt.NEAREST_INT_MAGIC), dtype=np.float32)
    return int((int(shifted.view(np.int32)) & 0x007FFFFF) - 0x00400000)


def fp16_bits(value: np.float32) -> int:
    """float32 -> IEEE half, rounding to nearest even (ggml's GGML_FP32_TO_FP16)."""
    return int(np.array(f32(value)).astype(np.float16).view(np.uint16))


X86_INVALID_INT = -(2**31)  # what x86's float->int conversion gives for NaN, inf, out of range


def _c_int(value: np.float32) -> int:
    """C's float -> int conversion (truncation); x86's answer when the value does not fit."""
    if not np.isfinite(value) or abs(float(value)) >= 2**31:
        return X86_INVALID_INT
    return int(value)


def _c_int8(value: np.float32) -> int:
    """C's (int8_t)value: the low byte of the int conversion, signed."""
    low = _c_int(value) & 0xFF
    return low - 256 if low >= 128 else low


def _round_away(value: np.float32) -> int:
    """C's (int)roundf(value): halves away from zero."""
    if not np.isfinite(value) or abs(float(value)) >= 2**31:
        return X86_INVALID_INT
    magnitude = int(np.floor(abs(float(value)) + 0.5))
    return -magnitude if value < 0 else magnitude


def quantize_q8_0(x: np.ndarray) -> bytes:
    out = bytearray()
    for block in x.reshape(-1, fmt.QK8_0):
        amax = f32(0)
        for value in block:
            amax = max(amax, abs(value))
        d = amax / f32(127)
        inverse = f32(1) / d if d else f32(0)
        out += fp16_bits(d).to_bytes(2, "little")
        out += bytes((_round_away(value * inverse) & 0xFF) for value in block)
    return bytes(out)


def _pack_q5(levels: list[int]) -> tuple[bytes, bytes]:
    """Low nibbles of weights j and j+16 in qs[j], 5th bits in the 32-bit qh."""
    high = 0
    for j, level in enumerate(levels):
        high |= ((level & 0x10) >> 4) << j
    low = bytes((levels[j] & 0x0F) | ((levels[j + 16] & 0x0F) << 4) for j in range(16))
    return high.to_bytes(4, "little"), low


def quantize_q5_0(x: np.ndarray) -> bytes:
    out = bytearray()
    for block in x.reshape(-1, fmt.QK8_0):
        amax, signed_max = f32(0), f32(0)
        for value in block:
            if amax < abs(value):
                amax, signed_max = abs(value), value
        d = signed_max / f32(-16)
        inverse = f32(1) / d if d else f32(0)
        levels = [min(31, _c_int8(value * inverse + f32(16.5))) & 0xFF for value in block]
        high, low = _pack_q5(levels)
        out += fp16_bits(d).to_bytes(2, "little") + high + low
    return bytes(out)


def quantize_q5_1(x: np.ndarray) -> bytes:
    out = bytearray()
    for block in x.reshape(-1, fmt.QK8_0):
        lo, hi = f32(np.finfo(np.float32).max), f32(-np.finfo(np.float32).max)
        for value in block:
            lo = value if value < lo else lo
            hi = value if value > hi else hi
        d = (hi - lo) / f32(31)
        inverse = f32(1) / d if d else f32(0)
        levels = [_c_int((value - lo) * inverse + f32(0.5)) & 0xFF for value in block]
        high, low = _pack_q5(levels)
        out += fp16_bits(d).to_bytes(2, "little") + fp16_bits(lo).to_bytes(2, "little") + high + low
    return bytes(out)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, search: fmt.SearchParams
                     ) -> tuple[np.float32, np.float32, list[int]]:
    """Best (scale, -min, levels) for x ~ scale*level + min, searched over nstep+1 iscales."""
    n, nmax = len(x), search.nmax
    lo = hi = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo = x[i] if x[i] < lo else lo
        hi = x[i] if x[i] > hi else hi
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if lo > 0:
        lo = f32(0)
    if hi == lo:
        return f32(0), -lo, [0] * n
    iscale = f32(nmax) / (hi - lo)
    scale = f32(1) / iscale
    levels = [max(0, min(nmax, nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
    best_error = f32(0)
    for i in range(n):
        diff = scale * f32(levels[i]) + lo - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(search.nstep + 1):
        iscale = (f32(search.rmin) + f32(search.rdelta) * f32(step) + f32(nmax)) / (hi - lo)
        trial = [max(0, min(nmax, nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = f32(0)
        for i in range(n):
            weighted = weights[i] * f32(trial[i])
            sum_l += weighted
            sum_l2 += weighted * f32(trial[i])
            sum_xl += weighted * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            error = f32(0)
            for i in range(n):
                diff = this_scale * f32(trial[i]) + this_min - x[i]
                error += weights[i] * (diff * diff)
            if error < best_error:
                levels, best_error, scale, lo = trial, error, this_scale, this_min
    return scale, -lo, levels


def _kquant_scales(x: np.ndarray, search: fmt.SearchParams
                   ) -> tuple[int, int, list[int], list[int], list[int]]:
    """Shared front half of Q4_K / Q5_K: per-32 search, 6-bit scales/mins, final levels."""
    scales, mins, levels = [], [], []
    for sub in x.reshape(-1, 32):
        sum_x2 = f32(0)
        for value in sub:
            sum_x2 += value * value
        av_x = np.sqrt(sum_x2 / f32(32))
        weights = np.array([av_x + abs(value) for value in sub], dtype=np.float32)
        scale, the_min, sub_levels = make_qkx2_quants(sub, weights, search)
        scales.append(scale)
        mins.append(the_min)
        levels += sub_levels
    max_scale = max_min = f32(0)
    for scale, the_min in zip(scales, mins):
        max_scale = scale if scale > max_scale else max_scale
        max_min = the_min if the_min > max_min else max_min
    inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
    inv_min = f32(63) / max_min if max_min > 0 else f32(0)
    q_scales = [min(63, nearest_int(inv_scale * s) & 0xFF) for s in scales]
    q_mins = [min(63, nearest_int(inv_min * m) & 0xFF) for m in mins]
    d_bits, dmin_bits = fp16_bits(max_scale / f32(63)), fp16_bits(max_min / f32(63))
    d_all = f32(np.array(d_bits, dtype=np.uint16).view(np.float16))
    dmin_all = f32(np.array(dmin_bits, dtype=np.uint16).view(np.float16))
    for j in range(len(scales)):
        d = d_all * f32(q_scales[j])
        if not d:
            continue
        dm = dmin_all * f32(q_mins[j])
        for ii in range(32):
            levels[32 * j + ii] = max(0, min(search.nmax, nearest_int((x[32 * j + ii] + dm) / d)))
    return d_bits, dmin_bits, q_scales, q_mins, levels


def _pack_scales_mins(q_scales: list[int], q_mins: list[int]) -> bytes:
    """Eight 6-bit scales and mins in 12 bytes (ggml's get_scale_min_k4 layout)."""
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j] = q_scales[j]
            packed[j + 4] = q_mins[j]
        else:
            packed[j + 4] = (q_scales[j] & 0xF) | ((q_mins[j] & 0xF) << 4)
            packed[j - 4] |= (q_scales[j] >> 4) << 6
            packed[j] |= (q_mins[j] >> 4) << 6
    return bytes(packed)


def quantize_q4_k(x: np.ndarray) -> bytes:
    out = bytearray()
    for block in x.reshape(-1, fmt.QK_K):
        d_bits, dmin_bits, q_scales, q_mins, levels = _kquant_scales(block, fmt.Q4_K_SEARCH)
        out += d_bits.to_bytes(2, "little") + dmin_bits.to_bytes(2, "little")
        out += _pack_scales_mins(q_scales, q_mins)
        for j in range(0, fmt.QK_K, 64):
            out += bytes(levels[j + l] | (levels[j + l + 32] << 4) for l in range(32))
    return bytes(out)


def quantize_q5_k(x: np.ndarray) -> bytes:
    out = bytearray()
    for block in x.reshape(-1, fmt.QK_K):
        d_bits, dmin_bits, q_scales, q_mins, levels = _kquant_scales(block, fmt.Q5_K_SEARCH)
        high, low = [0] * 32, bytearray()
        for pair, n in enumerate(range(0, fmt.QK_K, 64)):
            for j in range(32):
                first, second = levels[n + j], levels[n + j + 32]
                high[j] |= ((first >> 4) << (2 * pair)) | ((second >> 4) << (2 * pair + 1))
                low.append((first & 0xF) | ((second & 0xF) << 4))
        out += d_bits.to_bytes(2, "little") + dmin_bits.to_bytes(2, "little")
        out += _pack_scales_mins(q_scales, q_mins) + bytes(high) + bytes(low)
    return bytes(out)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.float32, list[int]]:
    """Symmetric scale for x ~ scale*(level - nmax), weighted by x^2 (rmse_type 1)."""
    amax, signed_max = f32(0), f32(0)
    for value in x:
        if abs(value) > amax:
            amax, signed_max = abs(value), value
    if amax < f32(fmt.GROUP_MAX_EPS):
        return f32(0), [0] * len(x)

    def sums(iscale: np.float32) -> tuple[np.float32, np.float32, list[int]]:
        sum_lx = sum_l2 = f32(0)
        levels = []
        for value in x:
            level = max(-nmax, min(nmax - 1, nearest_int(iscale * value)))
            levels.append(level + nmax)
            weight = value * value
            sum_lx += weight * value * f32(level)
            sum_l2 += weight * f32(level) * f32(level)
        return sum_lx, sum_l2, levels

    sum_lx, sum_l2, levels = sums(f32(-nmax) / signed_max)
    scale = sum_lx / sum_l2 if sum_l2 else f32(0)
    best = scale * sum_lx
    for step in fmt.Q6_K_TRIES:
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / signed_max
        sum_lx, sum_l2, trial = sums(iscale)
        if sum_l2 > 0 and sum_lx * sum_lx > best * sum_l2:
            levels, scale = trial, sum_lx / sum_l2
            best = scale * sum_lx
    return scale, levels


def quantize_q6_k(x: np.ndarray) -> bytes:
    out = bytearray()
    for block in x.reshape(-1, fmt.QK_K):
        scales, levels = [], []
        max_scale = max_abs_scale = f32(0)
        for sub in block.reshape(-1, 16):
            scale, sub_levels = make_qx_quants(sub, fmt.Q6_K_NMAX)
            scales.append(scale)
            levels += sub_levels
            if abs(scale) > max_abs_scale:
                max_abs_scale, max_scale = abs(scale), scale
        if max_abs_scale < f32(fmt.GROUP_MAX_EPS):
            out += bytes(fmt.BLOCK_LAYOUTS[fmt.QType.Q6_K].nbytes)
            continue
        iscale = f32(-128) / max_scale
        d_bits = fp16_bits(f32(1) / iscale)
        d_all = f32(np.array(d_bits, dtype=np.uint16).view(np.float16))
        q_scales = [min(127, nearest_int(iscale * s)) for s in scales]
        for j, q_scale in enumerate(q_scales):
            d = d_all * f32(q_scale)
            if not d:
                continue
            for ii in range(16):
                level = max(-32, min(31, nearest_int(block[16 * j + ii] / d)))
                levels[16 * j + ii] = level + 32
        ql, qh = bytearray(128), bytearray(64)
        for half in range(2):
            base = 128 * half
            for l in range(32):
                quad = [levels[base + l + 32 * k] for k in range(4)]
                ql[64 * half + l] = (quad[0] & 0xF) | ((quad[2] & 0xF) << 4)
                ql[64 * half + l + 32] = (quad[1] & 0xF) | ((quad[3] & 0xF) << 4)
                qh[32 * half + l] = sum((quad[k] >> 4) << (2 * k) for k in range(4))
        out += bytes(ql) + bytes(qh) + bytes(s & 0xFF for s in q_scales) + d_bits.to_bytes(2, "little")
    return bytes(out)


QUANTIZERS = {
    fmt.QType.Q8_0: quantize_q8_0,
    fmt.QType.Q5_0: quantize_q5_0,
    fmt.QType.Q5_1: quantize_q5_1,
    fmt.QType.Q4_K: quantize_q4_k,
    fmt.QType.Q5_K: quantize_q5_k,
    fmt.QType.Q6_K: quantize_q6_k,
}


def quantize(x: np.ndarray, qtype: fmt.QType) -> bytes:
    """Encode a 1-D float32 array (a whole number of blocks) block by block."""
    return QUANTIZERS[qtype](np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
