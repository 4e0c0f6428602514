/* The k-quant row quantizers of llama.cpp's ggml-quants.c (Q2_K ... Q6_K), with and without an
 * importance vector, giving the bytes of ggml_quantize_chunk; compiled after ggml_prelude.h (the
 * shared helpers) and kquant_search.c (the searches) as one source.
 *
 * Without importance ggml runs quantize_row_*_ref, with it quantize_row_*_impl; both are followed
 * here operation by operation in float32. Built by kquant_rows.py (through native_build) with
 * -ffp-contract=off and no fast-math, so every product and sum is rounded on its own, as in
 * ggml's x86-64 build (libggml-base has no -march, so no FMA).
 */

/* Per-weight importance of the _impl quantizers, qw * sqrt(sigma2 + x^2) (qw group-major, as the
 * weights), and each group's sum. sigma2 belongs to the lane's super-block. */
INLINE void importance_weights(int n, const lanes_t *x, const float *qw, const float *sigma2,
                               lanes_t *weights, float *group_sums) {
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES_MAX; ++k)
            weights[i][k] = qw[n * k + i] * sqrtf(sigma2[k] + x[i][k] * x[i][k]);
    for (int k = 0; k < LANES_MAX; ++k) group_sums[k] = 0.0f;
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES_MAX; ++k) group_sums[k] = group_sums[k] + weights[i][k];
}

/* ggml's second pass: each weight's level again from its group's stored scale d and min dm,
 * clamp(nearest_int((x + dm) / d), lo, hi) + offset (dm NULL: nearest_int(x / d)); a group whose
 * d is zero keeps its search level. Computed in lane order (so it vectorises), written to `out`
 * in the block's order: out[n * k + i] is weight i of group k. */
INLINE void requantize(int n, const lanes_t *x, const float *d, const float *dm, int lo, int hi,
                       int offset, const lanes_t *levels, uint8_t *out) {
    lanes_t final[32], shifted[32];
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES_MAX; ++k) shifted[i][k] = dm ? x[i][k] + dm[k] : x[i][k];
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < LANES_MAX; ++k) {
            const int level = clamp_int(nearest_int(shifted[i][k] / d[k]), lo, hi) + offset;
            final[i][k] = d[k] != 0.0f ? (float)level : levels[i][k];
        }
    for (int k = 0; k < LANES_MAX; ++k)
        for (int i = 0; i < n; ++i) out[n * k + i] = (uint8_t)final[i][k];
}

/* Two-bit levels of 128 weights a half, four weights 32 apart in one byte (Q2_K, Q3_K). */
INLINE void pack_2bit(const uint8_t *levels, uint8_t *qs) {
    for (int half = 0; half < QK_K; half += 128)
        for (int l = 0; l < 32; ++l)
            qs[half / 4 + l] = (uint8_t)(levels[half + l] | (levels[half + l + 32] << 2)
                                         | (levels[half + l + 64] << 4) | (levels[half + l + 96] << 6));
}

/* ---- Q2_K: scales u8[16] (scale | min << 4), qs u8[64], d f16, dmin f16 ---- */
static void q2_k_block(const float *x, const float *qw, uint8_t *out) {
    lanes_t xs[16], weights[16], levels[16];
    float scales[16], mins[16];
    uint8_t *packed_scales = out, *qs = out + 16;
    to_lanes(x, 16, 16, xs);
    if (qw) {
        lanes_t sigma2;  /* quantize_row_q2_K_impl's, without the factor 2 of the others */
        float group_sums[16];
        uint8_t scale_levels[16], min_levels[16];
        const float block_sigma2 = sum_of_squares(x, QK_K) / QK_K;
        for (int k = 0; k < 16; ++k) sigma2[k] = block_sigma2;
        importance_weights(16, xs, qw, sigma2, weights, group_sums);
        search_qkx(16, 16, xs, weights, 3, -0.9f, 0.05f, 36, 0, scales, mins, levels);
        put_fp16(out + 80, quantize_scales(16, 15, scales, scale_levels, group_sums));
        put_fp16(out + 82, quantize_scales(16, 15, mins, min_levels, group_sums));
        for (int j = 0; j < 16; ++j) packed_scales[j] = (uint8_t)(scale_levels[j] | (min_levels[j] << 4));
    } else {
        for (int i = 0; i < 16; ++i)
            for (int k = 0; k < 16; ++k) weights[i][k] = fabsf(xs[i][k]);
        search_qkx(16, 16, xs, weights, 3, -0.5f, 0.1f, 15, 1, scales, mins, levels);
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 16; ++j) {
            max_scale = scales[j] > max_scale ? scales[j] : max_scale;
            max_min = mins[j] > max_min ? mins[j] : max_min;
        }
        memset(packed_scales, 0, 16);
        put_fp16(out + 80, 0.0f);
        put_fp16(out + 82, 0.0f);
        if (max_scale > 0) {
            const float iscale = 15.0f / max_scale;
            for (int j = 0; j < 16; ++j) packed_scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
            put_fp16(out + 80, max_scale / 15.0f);
        }
        if (max_min > 0) {
            const float iscale = 15.0f / max_min;
            for (int j = 0; j < 16; ++j) packed_scales[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            put_fp16(out + 82, max_min / 15.0f);
        }
    }
    uint8_t final_levels[QK_K];
    float d[16], dm[16];
    const float d_all = get_fp16(out + 80), dmin_all = get_fp16(out + 82);
    for (int j = 0; j < 16; ++j) {
        d[j] = d_all * (float)(packed_scales[j] & 0xF);
        dm[j] = dmin_all * (float)(packed_scales[j] >> 4);
    }
    requantize(16, xs, d, dm, 0, 3, 0, levels, final_levels);
    pack_2bit(final_levels, qs);
}

/* ---- Q3_K: hmask u8[32], qs u8[64], scales u8[12] (16 six-bit scales), d f16 ---- */

/* The end of a Q3_K super-block: the six-bit scale levels (scale + 32) and d packed, each group's
 * scale read back from those bytes, the final levels (low two bits in qs, the third in hmask). */
static void q3_k_finish(const lanes_t *xs, const lanes_t *levels, const int *scale_levels,
                        float d_block, uint8_t *out) {
    uint8_t *hmask = out, *qs = out + 32, *packed = out + 96;
    memset(packed, 0, 12);
    for (int j = 0; j < 16; ++j) {
        packed[j % 8] |= (uint8_t)((scale_levels[j] & 0xF) << (j < 8 ? 0 : 4));
        packed[8 + j % 4] |= (uint8_t)((scale_levels[j] >> 4) << (2 * (j / 4)));
    }
    put_fp16(out + 108, d_block);
    uint8_t final_levels[QK_K];
    float d[16];
    const float d_all = get_fp16(out + 108);
    for (int j = 0; j < 16; ++j) {
        const int low = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
        const int8_t scale = (int8_t)((low | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        d[j] = d_all * (float)scale;
    }
    requantize(16, xs, d, NULL, -4, 3, 4, levels, final_levels);
    uint8_t high_bits[32] = {0}, low_bits[QK_K];
    for (int bit = 0; bit < 8; ++bit)  /* the high bit of weight j goes to bit j/32 of hmask[j%32] */
        for (int m = 0; m < 32; ++m) high_bits[m] |= (uint8_t)((final_levels[32 * bit + m] > 3) << bit);
    for (int j = 0; j < QK_K; ++j) low_bits[j] = (uint8_t)(final_levels[j] > 3 ? final_levels[j] - 4 : final_levels[j]);
    memcpy(hmask, high_bits, 32);
    pack_2bit(low_bits, qs);
}

/* Q3_K with importance (quantize_row_q3_K_impl): one super-block. */
static void q3_k_weighted(const float *x, const float *qw, uint8_t *out) {
    lanes_t xs[16], levels[16], weights[16], sigma2, block_scales[16], block_weights[16], block_levels[16];
    float scales[16], group_sums[16], d_block;
    int scale_levels[16];
    to_lanes(x, 16, 16, xs);
    const float block_sigma2 = 2 * sum_of_squares(x, QK_K) / QK_K;
    for (int k = 0; k < 16; ++k) sigma2[k] = block_sigma2;
    importance_weights(16, xs, qw, sigma2, weights, group_sums);
    search_qx(16, 16, xs, weights, 4, scales, levels);
    for (int j = 0; j < 16; ++j) { block_scales[j][0] = scales[j]; block_weights[j][0] = group_sums[j]; }
    search_qx(16, 1, block_scales, block_weights, 32, &d_block, block_levels);
    for (int j = 0; j < 16; ++j) scale_levels[j] = (int8_t)block_levels[j][0];
    q3_k_finish(xs, levels, scale_levels, d_block, out);
}

/* Q3_K without importance (quantize_row_q3_K_ref): one super-block. */
static void q3_k_plain(const float *x, uint8_t *out) {
    lanes_t xs[16], levels[16];
    float scales[16], d_block = 0.0f;
    int scale_levels[16] = {0};  /* all zero when every scale is: bytes and d stay zero */
    to_lanes(x, 16, 16, xs);
    search_q3(xs, scales, levels);
    float max_scale = 0.0f, amax = 0.0f;
    for (int j = 0; j < 16; ++j) {
        const float magnitude = fabsf(scales[j]);
        max_scale = magnitude > amax ? scales[j] : max_scale;
        amax = magnitude > amax ? magnitude : amax;
    }
    if (max_scale != 0.0f) {
        const float iscale = -32.0f / max_scale;
        for (int j = 0; j < 16; ++j) {
            const int8_t level = (int8_t)nearest_int(iscale * scales[j]);
            scale_levels[j] = clamp_int(level, -32, 31) + 32;
        }
        d_block = 1.0f / iscale;
    }
    q3_k_finish(xs, levels, scale_levels, d_block, out);
}

/* ---- Q4_K / Q5_K: d, dmin f16, scales u8[12] (eight 6-bit scales and mins), [qh u8[32]], qs ----
 * Their groups are 32 weights, 8 a super-block, so two super-blocks fill the 16 lanes. */

/* One super-block's 6-bit scales and mins packed into `out` (whose d and dmin are written), and
 * each group's d and dm read back from those bytes, as ggml's second pass reads them. */
static void q45_k_scales(const uint8_t *scale_levels, const uint8_t *min_levels, uint8_t *out,
                         float *d, float *dm) {
    uint8_t *packed = out + 4;
    for (int j = 0; j < 4; ++j) {
        packed[j] = scale_levels[j];
        packed[j + 4] = min_levels[j];
    }
    for (int j = 4; j < 8; ++j) {
        packed[j + 4] = (uint8_t)((scale_levels[j] & 0xF) | ((min_levels[j] & 0xF) << 4));
        packed[j - 4] |= (uint8_t)((scale_levels[j] >> 4) << 6);
        packed[j] |= (uint8_t)((min_levels[j] >> 4) << 6);
    }
    const float d_all = get_fp16(out), dmin_all = get_fp16(out + 2);
    for (int j = 0; j < 8; ++j) {
        const int scale = j < 4 ? packed[j] & 63 : (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        const int the_min = j < 4 ? packed[j + 4] & 63 : (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        d[j] = d_all * (float)scale;
        dm[j] = dmin_all * (float)the_min;
    }
}

/* One super-block's levels (in its order) as qs, 64 weights in 32 bytes, and for Q5_K qh: bit
 * 2p / 2p+1 of qh[l] is the 5th bit of weight 64p + l / 64p + 32 + l. */
static void q45_k_levels(const uint8_t *levels, int nmax, uint8_t *out) {
    uint8_t *qs = out + (nmax == 15 ? 16 : 48);
    if (nmax == 31) {
        uint8_t *qh = out + 16;
        memset(qh, 0, 32);
        for (int pair = 0; pair < 4; ++pair)
            for (int l = 0; l < 32; ++l) {
                const uint8_t first = levels[64 * pair + l], second = levels[64 * pair + 32 + l];
                qh[l] |= (uint8_t)(((first >> 4) << (2 * pair)) | ((second >> 4) << (2 * pair + 1)));
            }
    }
    for (int pair = 0; pair < 4; ++pair)
        for (int l = 0; l < 32; ++l)
            qs[32 * pair + l] = (uint8_t)((levels[64 * pair + l] & 0xF) | ((levels[64 * pair + 32 + l] & 0xF) << 4));
}

/* Two consecutive super-blocks x[0..511] (importance qw[0..511] or NULL) -> out_a, out_b. */
static void q45_k_pair(const float *x, const float *qw, int nmax, uint8_t *out_a, uint8_t *out_b) {
    lanes_t xs[32], weights[32], levels[32];
    float scales[16], mins[16];
    uint8_t scale_levels[16], min_levels[16];
    to_lanes(x, 32, 16, xs);
    if (qw) {
        lanes_t sigma2;
        float group_sums[16];
        for (int half = 0; half < 2; ++half) {
            const float block_sigma2 = 2 * sum_of_squares(x + QK_K * half, QK_K) / QK_K;
            for (int k = 8 * half; k < 8 * half + 8; ++k) sigma2[k] = block_sigma2;
        }
        importance_weights(32, xs, qw, sigma2, weights, group_sums);
        search_qkx(32, 16, xs, weights, nmax, -0.9f, 0.05f, 36, 0, scales, mins, levels);
        for (int half = 0; half < 2; ++half) {
            uint8_t *out = half ? out_b : out_a;
            const int lane0 = 8 * half;
            put_fp16(out, quantize_scales(8, 63, scales + lane0, scale_levels + lane0, group_sums + lane0));
            put_fp16(out + 2, quantize_scales(8, 63, mins + lane0, min_levels + lane0, group_sums + lane0));
        }
        if (nmax == 31)  /* quantize_row_q5_K_impl clamps the levels to 63, q4_K's does not */
            for (int j = 0; j < 16; ++j) {
                scale_levels[j] = scale_levels[j] < 63 ? scale_levels[j] : 63;
                min_levels[j] = min_levels[j] < 63 ? min_levels[j] : 63;
            }
    } else {
        float sums[16] = {0};
        for (int i = 0; i < 32; ++i)
            for (int k = 0; k < 16; ++k) sums[k] = sums[k] + xs[i][k] * xs[i][k];
        for (int k = 0; k < 16; ++k) {
            const float av_x = sqrtf(sums[k] / 32);
            for (int i = 0; i < 32; ++i) weights[i][k] = av_x + fabsf(xs[i][k]);
        }
        if (nmax == 15)
            search_qkx(32, 16, xs, weights, 15, -1.0f, 0.1f, 20, 0, scales, mins, levels);
        else
            search_qkx(32, 16, xs, weights, 31, -0.5f, 0.1f, 15, 0, scales, mins, levels);
        for (int half = 0; half < 2; ++half) {
            uint8_t *out = half ? out_b : out_a;
            const int lane0 = 8 * half;
            float max_scale = 0.0f, max_min = 0.0f;
            for (int j = lane0; j < lane0 + 8; ++j) {
                max_scale = scales[j] > max_scale ? scales[j] : max_scale;
                max_min = mins[j] > max_min ? mins[j] : max_min;
            }
            const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
            const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
            for (int j = lane0; j < lane0 + 8; ++j) {
                const uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
                const uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
                scale_levels[j] = ls < 63 ? ls : 63;
                min_levels[j] = lm < 63 ? lm : 63;
            }
            put_fp16(out, max_scale / 63.0f);
            put_fp16(out + 2, max_min / 63.0f);
        }
    }
    float d[16], dm[16];
    uint8_t final_levels[2 * QK_K];
    q45_k_scales(scale_levels, min_levels, out_a, d, dm);
    q45_k_scales(scale_levels + 8, min_levels + 8, out_b, d + 8, dm + 8);
    requantize(32, xs, d, dm, 0, nmax, 0, levels, final_levels);
    q45_k_levels(final_levels, nmax, out_a);
    q45_k_levels(final_levels + QK_K, nmax, out_b);
}

/* ---- Q6_K: ql u8[128], qh u8[64], scales i8[16], d f16 ---- */
static void q6_k_block(const float *x, const float *qw, uint8_t *out) {
    lanes_t xs[16], levels[16], weights[16];
    float scales[16];
    to_lanes(x, 16, 16, xs);
    if (qw) to_lanes(qw, 16, 16, weights);  /* make_qx_quants takes the importance as is here */
    search_qx(16, 16, xs, qw ? weights : NULL, 32, scales, levels);
    float max_scale = 0.0f, max_abs = 0.0f;
    for (int j = 0; j < 16; ++j) {
        const float magnitude = fabsf(scales[j]);
        max_scale = magnitude > max_abs ? scales[j] : max_scale;
        max_abs = magnitude > max_abs ? magnitude : max_abs;
    }
    memset(out, 0, 210);
    if (max_abs < GROUP_MAX_EPS) return;
    int8_t *packed_scales = (int8_t *)(out + 192);
    const float iscale = -128.0f / max_scale;
    put_fp16(out + 208, 1.0f / iscale);
    for (int j = 0; j < 16; ++j) {
        const int level = nearest_int(iscale * scales[j]);
        packed_scales[j] = (int8_t)(level < 127 ? level : 127);
    }
    uint8_t final_levels[QK_K];
    float d[16];
    const float d_all = get_fp16(out + 208);
    for (int j = 0; j < 16; ++j) d[j] = d_all * (float)packed_scales[j];
    requantize(16, xs, d, NULL, -32, 31, 32, levels, final_levels);
    uint8_t *ql = out, *qh = out + 128;
    for (int half = 0; half < 2; ++half)
        for (int l = 0; l < 32; ++l) {
            const uint8_t *quad = final_levels + 128 * half + l;  /* weights l, l+32, l+64, l+96 */
            ql[64 * half + l] = (uint8_t)((quad[0] & 0xF) | ((quad[64] & 0xF) << 4));
            ql[64 * half + l + 32] = (uint8_t)((quad[32] & 0xF) | ((quad[96] & 0xF) << 4));
            qh[32 * half + l] = (uint8_t)((quad[0] >> 4) | ((quad[32] >> 4) << 2)
                                          | ((quad[64] >> 4) << 4) | ((quad[96] >> 4) << 6));
        }
}

enum { GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14 };

/* rows: n_rows x n_cols floats (n_cols a multiple of 256); importance: n_cols floats or NULL, the
 * same for every row; out: n_rows x (n_cols / 256 * block bytes). Returns the bytes written, 0 for
 * a type not here. The super-blocks of consecutive rows are consecutive floats, so they are
 * numbered through: block g starts at rows + 256 g and its importance at column 256 (g % per_row). */
long quantize_rows(int ggml_type, const float *rows, const float *importance, uint8_t *out,
                   long n_rows, long n_cols) {
    long block_bytes;
    switch (ggml_type) {
        case GGML_Q2_K: block_bytes = 84; break;
        case GGML_Q3_K: block_bytes = 110; break;
        case GGML_Q4_K: block_bytes = 144; break;
        case GGML_Q5_K: block_bytes = 176; break;
        case GGML_Q6_K: block_bytes = 210; break;
        default: return 0;
    }
    const long per_row = n_cols / QK_K, blocks = n_rows * per_row;
    if (ggml_type == GGML_Q4_K || ggml_type == GGML_Q5_K) {  /* two super-blocks fill the lanes */
        for (long g = 0; g < blocks; g += 2) {
            float x[2 * QK_K], qw[2 * QK_K];
            uint8_t spare[176];  /* the unused second half of an odd block out */
            const int pair = g + 1 < blocks;
            memcpy(x, rows + g * QK_K, (size_t)(pair ? 2 : 1) * QK_K * sizeof(float));
            if (!pair) memset(x + QK_K, 0, QK_K * sizeof(float));
            if (importance) {
                memcpy(qw, importance + (g % per_row) * QK_K, QK_K * sizeof(float));
                memcpy(qw + QK_K, importance + ((g + 1) % per_row) * QK_K, QK_K * sizeof(float));
            }
            q45_k_pair(x, importance ? qw : NULL, ggml_type == GGML_Q4_K ? 15 : 31, out + g * block_bytes,
                       pair ? out + (g + 1) * block_bytes : spare);
        }
    } else {
        for (long g = 0; g < blocks; ++g) {
            const float *x = rows + g * QK_K;
            const float *qw = importance ? importance + (g % per_row) * QK_K : NULL;
            uint8_t *block = out + g * block_bytes;
            if (ggml_type == GGML_Q2_K) q2_k_block(x, qw, block);
            else if (ggml_type == GGML_Q3_K && qw) q3_k_weighted(x, qw, block);
            else if (ggml_type == GGML_Q3_K) q3_k_plain(x, block);
            else q6_k_block(x, qw, block);
        }
    }
    return blocks * block_bytes;
}
