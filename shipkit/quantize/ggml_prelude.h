/* Helpers shared by the quantizers' C sources (row_quants.c, kquant_search.c + kquant_rows.c):
 * native_build.py compiles this text in front of each of them. They are ggml-quants.c's
 * primitives, each giving ggml's result bit for bit. The small ones are always inlined, as they
 * sit in the loops gcc vectorises; the fp16 converters stay plain static, as each source had
 * them, so gcc keeps fp32_to_fp16 out of line and the compiled loops are what they were.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GROUP_MAX_EPS 1e-15f  /* ggml-quants.c: a group with max |x| below it is all zeros */
#define INLINE static inline __attribute__((always_inline))

/* ggml's nearest_int: the float add rounds to an integer (half to even) and the low mantissa
 * bits hold it. Out of its domain (|v| > 2^22, inf, NaN) it still gives ggml's answer. */
INLINE int nearest_int(float value) {
    float shifted = value + 12582912.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007fffff) - 0x00400000;
}

/* Two plain selects: a nested ?: stops gcc vectorising the loops that call it. */
INLINE int clamp_int(int value, int lo, int hi) {
    value = value < lo ? lo : value;
    return value > hi ? hi : value;
}

/* float32 -> IEEE half bits, rounded to nearest even in integers (independent of MXCSR); a NaN
 * becomes 0x7e00 with its sign, as ggml's GGML_FP32_TO_FP16 writes it. */
static uint16_t fp32_to_fp16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    const uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return sign | 0x7e00;
    if (magnitude >= 0x477ff000) return sign | 0x7c00;  /* rounds past 65504: inf */
    if (magnitude < 0x38800000) {                        /* half subnormal (or zero) */
        const int shift = 126 - (int)(magnitude >> 23);  /* 14 + (113 - exponent) */
        if (shift > 24) return sign;
        const uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000;
        uint32_t half = mantissa >> shift;
        const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (half & 1))) half += 1;
        return sign | (uint16_t)half;
    }
    uint32_t half = (magnitude - 0x38000000) >> 13;  /* rebias 127 -> 15 */
    const uint32_t rest = magnitude & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half += 1;
    return sign | (uint16_t)half;
}

static float fp16_to_fp32(uint16_t half) {
    const uint32_t sign = (uint32_t)(half & 0x8000) << 16;
    const uint32_t exponent = (half >> 10) & 0x1f, mantissa = half & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {  /* zero or subnormal: mantissa * 2^-24 is exact in float */
        float value = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -value : value;
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* A block's fp16 field (ggml_half), stored as one 16-bit write (native_build builds on
 * little-endian hosts only): written byte by byte, Q4_0's and Q4_1's block loops ran 2x slower. */
INLINE void put_fp16(uint8_t *out, float value) {
    const uint16_t half = fp32_to_fp16(value);
    memcpy(out, &half, sizeof half);
}

INLINE float get_fp16(const uint8_t *in) { return fp16_to_fp32((uint16_t)(in[0] | (in[1] << 8))); }

/* sum x^2 in ggml's order (one float accumulator, left to right): the quantize_row_*_impl
 * quantizers' sigma2 is this over the row (legacy types) or the super-block, times 1/n or 2/n. */
INLINE float sum_of_squares(const float *values, long n) {
    float total = 0.0f;
    for (long i = 0; i < n; ++i) total = total + values[i] * values[i];
    return total;
}
