/* llama.cpp's row quantizers for the legacy types Q4_0, Q4_1, Q5_0, Q5_1 (ggml-quants.c's
 * quantize_row_*_ref without an importance vector, quantize_row_*_impl with one) and for IQ4_NL and
 * IQ4_XS with or without one (quantize_row_iq4_nl_impl, the only path ggml_quantize_chunk takes
 * for them): the bytes of ggml_quantize_chunk.
 *
 * Each function is ggml's scalar float32 arithmetic in ggml's order. Compiled with
 * -ffp-contract=off and no fast-math (native_build.py), every product and sum is rounded on its
 * own, as in ggml's x86-64 build (no FMA there). What is ours is how the nearest IQ4 level is
 * found (iq4_indices: the same index, without branches, so that gcc vectorises the IQ4 search
 * that dominates its cost). One call encodes a run of whole rows; row_quants.py spreads row
 * chunks over threads. The helpers (nearest_int, clamp_int, put_fp16, ...) are ggml_prelude.h's,
 * which native_build compiles in front of this file.
 */
#include <float.h>

#define BLOCK 32          /* weights per Q4_0 / Q5_0 / Q5_1 / IQ4_NL block, and per IQ4_XS group */
#define SUPER_BLOCK 256   /* weights per IQ4_XS block */

/* ggml's kvalues_iq4nl: the 16 non-linear levels of IQ4_NL and IQ4_XS, in increasing order. */
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1, 13, 25, 38, 53, 69, 89, 113};

/* The legacy types' loops run 2.5x faster as 128-bit vectors than as the 512-bit ones gcc picks
   with -march=native on an AVX-512 host (measured on the reference Q4_0 path); the IQ4 search
   below keeps the wide ones. */
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=128")

/* C's float -> small int conversion as gcc emits it on x86-64 (cvttss2si, then the low byte):
   ggml's reference quantizers cast out-of-range values (a NaN, an inf from a denormal scale). */
static int low_byte(float value) {
    return (int8_t)(int32_t)value;
}

/* The symmetric reference quantizers (quantize_row_q4_0_ref, q5_0_ref): d = -(the first value of
   largest magnitude) / half, starting from +0 so an all-zero block stores d = -0. */
static float symmetric_ref(const float* x, int half, uint8_t* levels) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < BLOCK; ++j) {
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    }
    float d = max / -half, inverse = d ? 1.0f / d : 0.0f;
    for (int j = 0; j < BLOCK; ++j) {
        int level = low_byte(x[j] * inverse + (half + 0.5f));
        levels[j] = (uint8_t)(level < 2 * half - 1 ? level : 2 * half - 1);
    }
    return d;
}

/* The affine reference quantizers (quantize_row_q4_1_ref, q5_1_ref): d = (max - min) / levels;
   *min_out = min. Q5_1's levels are not clamped, as in ggml. */
static float affine_ref(const float* x, int top, int clamp, uint8_t* levels, float* min_out) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < BLOCK; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    float d = (max - min) / top, inverse = d ? 1.0f / d : 0.0f;
    for (int j = 0; j < BLOCK; ++j) {
        int level = low_byte((x[j] - min) * inverse + 0.5f);
        levels[j] = (uint8_t)(clamp && level > top ? top : level);
    }
    *min_out = min;
    return d;
}

/* Weights of a block with importance: importance * sqrt(sigma2 + x^2). */
static void importance_weights(const float* x, const float* importance, float sigma2, float* out) {
    for (int j = 0; j < BLOCK; ++j) out[j] = importance[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* make_qx_quants(BLOCK, nmax, x, L, rmse_type 1, weights): levels 0..2*nmax-1, returns d. */
static float weighted_symmetric(int nmax, const float* x, const float* weights, uint8_t* levels) {
    float max = 0, amax = 0;
    for (int i = 0; i < BLOCK; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(levels, 0, BLOCK);
        return 0.0f;
    }
    float iscale = -nmax / max, sum_lx = 0, sum_l2 = 0;
    for (int i = 0; i < BLOCK; ++i) {
        int l = clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        levels[i] = (uint8_t)(l + nmax);
        sum_lx += weights[i] * x[i] * l;
        sum_l2 += weights[i] * l * l;
    }
    float scale = sum_l2 != 0 ? sum_lx / sum_l2 : 0.0f, best = scale * sum_lx;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        iscale = -(nmax + 0.1f * step) / max;
        sum_lx = sum_l2 = 0;
        for (int i = 0; i < BLOCK; ++i) {
            int l = clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
            sum_lx += weights[i] * x[i] * l;
            sum_l2 += weights[i] * l * l;
        }
        if (sum_l2 > 0 && sum_lx * sum_lx > best * sum_l2) {
            for (int i = 0; i < BLOCK; ++i)
                levels[i] = (uint8_t)(nmax + clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1));
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
        }
    }
    return scale;
}

/* make_qkx3_quants(BLOCK, nmax, x, weights, L, &the_min, Laux, -0.9f, 0.05f, 36, use_mad false):
   levels 0..nmax, returns d and writes the (non-positive) offset to *min_out. */
static float weighted_affine(int nmax, const float* x, const float* weights, uint8_t* levels,
                             float* min_out) {
    const int nstep = 36;
    const float rmin = -0.9f, rdelta = 0.05f;
    float min = x[0], max = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
    for (int i = 1; i < BLOCK; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max <= min) {
        memset(levels, 0, BLOCK);
        *min_out = min;
        return 0.0f;
    }
    float iscale = nmax / (max - min), scale = 1 / iscale, best_error = 0;
    for (int i = 0; i < BLOCK; ++i) {
        levels[i] = (uint8_t)clamp_int(nearest_int(iscale * (x[i] - min)), 0, nmax);
        float diff = scale * levels[i] + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    uint8_t trial[BLOCK];
    for (int step = 0; step <= nstep; ++step) {
        iscale = (rmin + rdelta * step + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < BLOCK; ++i) {
            int l = clamp_int(nearest_int(iscale * (x[i] - min)), 0, nmax);
            trial[i] = (uint8_t)l;
            sum_l += weights[i] * l;
            sum_l2 += weights[i] * l * l;
            sum_xl += weights[i] * l * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float error = 0;
        for (int i = 0; i < BLOCK; ++i) {
            float diff = this_scale * trial[i] + this_min - x[i];
            error += weights[i] * (diff * diff);
        }
        if (error < best_error) {
            memcpy(levels, trial, BLOCK);
            best_error = error;
            scale = this_scale;
            min = this_min;
        }
    }
    *min_out = min;
    return scale;
}

/* Four-bit levels: weights j and j+16 share byte j (low nibble, high nibble). */
static void pack_nibbles(const uint8_t* levels, uint8_t* qs) {
    for (int j = 0; j < BLOCK / 2; ++j) qs[j] = (uint8_t)(levels[j] | (levels[j + BLOCK / 2] << 4));
}

/* Five-bit levels: low nibbles as pack_nibbles; bit 4 of weight j is bit j of qh. */
static void pack_five_bits(const uint8_t* levels, uint8_t* qh_out, uint8_t* qs) {
    uint32_t qh = 0;
    for (int j = 0; j < BLOCK / 2; ++j) {
        qs[j] = (uint8_t)((levels[j] & 0x0f) | ((levels[j + BLOCK / 2] & 0x0f) << 4));
        qh |= (uint32_t)((levels[j] >> 4) & 1) << j;
        qh |= (uint32_t)((levels[j + BLOCK / 2] >> 4) & 1) << (j + BLOCK / 2);
    }
    memcpy(qh_out, &qh, 4);
}

/* One block of each legacy type; weights NULL: ggml's quantize_row_*_ref, else its _impl. */
INLINE void q4_0_block(const float* x, const float* weights, uint8_t* out) {  /* {d, qs[16]} */
    uint8_t levels[BLOCK];
    put_fp16(out, weights ? weighted_symmetric(8, x, weights, levels) : symmetric_ref(x, 8, levels));
    pack_nibbles(levels, out + 2);
}

INLINE void q4_1_block(const float* x, const float* weights, uint8_t* out) {  /* {d, m, qs[16]} */
    uint8_t levels[BLOCK];
    float min;
    put_fp16(out, weights ? weighted_affine(15, x, weights, levels, &min)
                          : affine_ref(x, 15, 1, levels, &min));
    put_fp16(out + 2, min);
    pack_nibbles(levels, out + 4);
}

INLINE void q5_0_block(const float* x, const float* weights, uint8_t* out) {  /* {d, qh[4], qs[16]} */
    uint8_t levels[BLOCK];
    put_fp16(out, weights ? weighted_symmetric(16, x, weights, levels) : symmetric_ref(x, 16, levels));
    pack_five_bits(levels, out + 2, out + 6);
}

INLINE void q5_1_block(const float* x, const float* weights, uint8_t* out) {  /* {d, m, qh[4], qs[16]} */
    uint8_t levels[BLOCK];
    float min;
    put_fp16(out, weights ? weighted_affine(31, x, weights, levels, &min)
                          : affine_ref(x, 31, 0, levels, &min));
    put_fp16(out + 2, min);
    pack_five_bits(levels, out + 4, out + 8);
}

/* Rows of 32-weight blocks of `nbytes` each, with weights from the importance when it is given.
   Inlined into each caller, so `encode` is a direct call that gcc can inline in turn. */
INLINE void legacy_rows(void (*encode)(const float*, const float*, uint8_t*), int nbytes, const float* x,
                        const float* importance, uint8_t* out, long rows, long columns) {
    float weights[BLOCK];
    if (!importance) {  /* a loop of its own, where gcc sees that the weights are NULL */
        for (long start = 0; start < rows * columns; start += BLOCK, out += nbytes)
            encode(x + start, NULL, out);
        return;
    }
    for (long row = 0; row < rows; ++row, x += columns) {
        float sigma2 = sum_of_squares(x, columns) / columns;
        for (long start = 0; start < columns; start += BLOCK, out += nbytes) {
            importance_weights(x + start, importance + start, sigma2, weights);
            encode(x + start, weights, out);
        }
    }
}

void q4_0_rows(const float* x, const float* importance, uint8_t* out, long rows, long columns) {
    legacy_rows(q4_0_block, 18, x, importance, out, rows, columns);
}

void q4_1_rows(const float* x, const float* importance, uint8_t* out, long rows, long columns) {
    legacy_rows(q4_1_block, 20, x, importance, out, rows, columns);
}

void q5_0_rows(const float* x, const float* importance, uint8_t* out, long rows, long columns) {
    legacy_rows(q5_0_block, 22, x, importance, out, rows, columns);
}

void q5_1_rows(const float* x, const float* importance, uint8_t* out, long rows, long columns) {
    legacy_rows(q5_1_block, 24, x, importance, out, rows, columns);
}

#pragma GCC pop_options

/* The indices of the IQ4 levels nearest to inverse * x[j] for a group: ggml's best_index_int8,
   whose bisection ends on the pair lo <= v < hi (v below or above the table: the end pair) and
   takes lo if v - lo < hi - v, in float as ggml computes it. Here the pair is found by comparing
   v with every level, select by select, so gcc runs the group's weights side by side. A NaN
   (1/scale overflowed, times 0) ends ggml's bisection on index 15. */
static void iq4_indices(const float* x, float inverse, int* index) {
    for (int j = 0; j < BLOCK; ++j) {
        float v = inverse * x[j], lo = IQ4_LEVELS[0], hi = IQ4_LEVELS[1];
        int upper = 1;
        for (int i = 1; i < 15; ++i) {
            int above = v >= IQ4_LEVELS[i];
            lo = above ? IQ4_LEVELS[i] : lo;
            hi = above ? IQ4_LEVELS[i + 1] : hi;
            upper += above;
        }
        int nearest = v - lo < hi - v ? upper - 1 : upper;
        index[j] = v != v ? 15 : nearest;
    }
}

/* The weighted fit of one 32-weight group's levels for a trial inverse scale: sum w*q*x, sum w*q*q. */
static void iq4_fit(const float* x, const float* weights, float inverse, float* sum_qx, float* sum_q2) {
    int index[BLOCK];
    iq4_indices(x, inverse, index);
    *sum_qx = *sum_q2 = 0;
    for (int j = 0; j < BLOCK; ++j) {
        float q = IQ4_LEVELS[index[j]];
        *sum_qx += weights[j] * q * x[j];
        *sum_q2 += weights[j] * q * q;
    }
}

/* A 32-weight group's scale (quantize_row_iq4_nl_impl, ntry 7): the largest |x| on the table's
   end, then 15 inverse scales around it; the best weighted fit wins. 0 for an all-but-zero group. */
static float iq4_group_scale(const float* x, const float* weights) {
    const int ntry = 7;
    float amax = 0, max = 0, sum_qx, sum_q2;
    for (int j = 0; j < BLOCK; ++j) {
        float ax = fabsf(x[j]);
        if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (amax < GROUP_MAX_EPS) return 0;
    iq4_fit(x, weights, 1 / (-max / IQ4_LEVELS[0]), &sum_qx, &sum_q2);
    float d = sum_q2 > 0 ? sum_qx / sum_q2 : 0.0f, best = d * sum_qx;
    for (int step = -ntry; step <= ntry; ++step) {
        iq4_fit(x, weights, (step + IQ4_LEVELS[0]) / max, &sum_qx, &sum_q2);
        if (sum_q2 > 0 && sum_qx * sum_qx > best * sum_q2) {
            d = sum_qx / sum_q2;
            best = d * sum_qx;
        }
    }
    return d;
}

/* Group weights: importance * sqrt(sigma2 + x^2) with sigma2 twice the super-block's mean
   square, or x^2 without importance. */
static void iq4_weights(const float* x, const float* importance, float sigma2, float* out) {
    for (int j = 0; j < BLOCK; ++j)
        out[j] = importance ? importance[j] * sqrtf(sigma2 + x[j] * x[j]) : x[j] * x[j];
}

static float iq4_sigma2(const float* x, int n) {
    return sum_of_squares(x, n) * (2.0f / n);
}

/* Levels of a 32-weight group at scale d, packed two to a byte (weights j and j+16). */
static void iq4_pack(const float* x, float d, uint8_t* qs) {
    int index[BLOCK];
    iq4_indices(x, d ? 1 / d : 0.0f, index);
    for (int j = 0; j < BLOCK / 2; ++j) qs[j] = (uint8_t)(index[j] | (index[j + 16] << 4));
}

/* block_iq4_nl {d, qs[16]} per 32 weights; importance may be NULL. */
void iq4_nl_rows(const float* x, const float* importance, uint8_t* out, long rows, long columns) {
    float weights[BLOCK];
    for (long row = 0; row < rows; ++row, x += columns) {
        for (long start = 0; start < columns; start += BLOCK, out += 18) {
            const float* importance_block = importance ? importance + start : NULL;
            iq4_weights(x + start, importance_block, iq4_sigma2(x + start, BLOCK), weights);
            float d = iq4_group_scale(x + start, weights);
            put_fp16(out, d);
            iq4_pack(x + start, d, out + 2);
        }
    }
}

/* block_iq4_xs {d, scales_h, scales_l[4], qs[128]} per 256 weights: eight groups whose scales
   are 6-bit multiples of d = -(the scale of largest magnitude) / 32; importance may be NULL. */
void iq4_xs_rows(const float* x, const float* importance, uint8_t* out, long rows, long columns) {
    const int groups = SUPER_BLOCK / BLOCK;
    float weights[BLOCK], scales[SUPER_BLOCK / BLOCK];
    for (long row = 0; row < rows; ++row, x += columns) {
        for (long start = 0; start < columns; start += SUPER_BLOCK, out += 136) {
            const float* xs = x + start;
            float sigma2 = iq4_sigma2(xs, SUPER_BLOCK), max_scale = 0, amax_scale = 0;
            for (int g = 0; g < groups; ++g) {
                const float* importance_group = importance ? importance + start + BLOCK * g : NULL;
                iq4_weights(xs + BLOCK * g, importance_group, sigma2, weights);
                scales[g] = iq4_group_scale(xs + BLOCK * g, weights);
                if (fabsf(scales[g]) > amax_scale) { amax_scale = fabsf(scales[g]); max_scale = scales[g]; }
            }
            float d = -max_scale / 32, inverse = d ? 1 / d : 0.0f;
            uint16_t scales_high = 0;
            put_fp16(out, d);
            memset(out + 4, 0, 4);
            for (int g = 0; g < groups; ++g) {
                int l = clamp_int(nearest_int(inverse * scales[g]), -32, 31);
                iq4_pack(xs + BLOCK * g, d * l, out + 8 + 16 * g);
                l += 32;
                out[4 + g / 2] |= (uint8_t)((l & 0x0f) << (4 * (g % 2)));
                scales_high |= (uint16_t)((l >> 4) << (2 * g));
            }
            memcpy(out + 2, &scales_high, 2);
        }
    }
}
