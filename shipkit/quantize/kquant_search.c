/* The searches of llama.cpp's k-quant quantizers (ggml-quants.c), for kquant_rows.c. native_build
 * compiles ggml_prelude.h (the shared helpers), this file and kquant_rows.c as one source.
 *
 * Each follows ggml's float32 arithmetic operation by operation. What is ours is the layout: the
 * searches of a super-block's groups run side by side, group k in lane k ("x[i][k]": weight i of
 * group k), so that gcc vectorises across groups. A lane takes every branch of ggml's code and a
 * select keeps what ggml would have kept, so each group still sees ggml's own sequence of float
 * operations. Integer types are ggml's where a value can wrap (levels in uint8_t / int8_t).
 */
#define QK_K 256
#define LANES_MAX 16          /* groups of one super-block: 8 of 32 weights or 16 of 16 */

typedef float lanes_t[LANES_MAX];

/* A super-block's groups of `n` weights side by side: out[i][k] = block[n * k + i]. */
INLINE void to_lanes(const float *block, int n, int lanes, lanes_t *out) {
    for (int k = 0; k < lanes; ++k)
        for (int i = 0; i < n; ++i) out[i][k] = block[n * k + i];
}

/* make_qkx2_quants, and make_qkx3_quants with weights (the same search), on `lanes` groups:
 * x ~ scale * level - min_out with levels 0..nmax, best of nstep+1 trial scales under the
 * weighted squared (or, use_mad, absolute) error. An accepted trial moves the min that later
 * trials start from, so `lo` is tracked per lane; a group's levels follow from the iscale and
 * min of the trial that won, so they are made once at the end. */
INLINE void search_qkx(int n, int lanes, const lanes_t *x, const lanes_t *w, int nmax, float rmin,
                       float rdelta, int nstep, int use_mad, float *scale_out, float *min_out,
                       lanes_t *levels) {
    lanes_t lo, hi, first_lo, sum_w, sum_x, iscale, scale, best_error, best_iscale, best_shift;
    lanes_t sum_l, sum_l2, sum_xl, det, this_scale, this_min, error;
    lanes_t trial[32];
    for (int k = 0; k < lanes; ++k) {
        lo[k] = x[0][k]; hi[k] = x[0][k];
        sum_w[k] = w[0][k]; sum_x[k] = w[0][k] * x[0][k];
    }
    for (int i = 1; i < n; ++i)
        for (int k = 0; k < lanes; ++k) {
            lo[k] = x[i][k] < lo[k] ? x[i][k] : lo[k];
            hi[k] = x[i][k] > hi[k] ? x[i][k] : hi[k];
            sum_w[k] = sum_w[k] + w[i][k];
            sum_x[k] = sum_x[k] + w[i][k] * x[i][k];
        }
    for (int k = 0; k < lanes; ++k) {
        lo[k] = lo[k] > 0 ? 0.0f : lo[k];
        first_lo[k] = lo[k];
        iscale[k] = (float)nmax / (hi[k] - lo[k]);
        scale[k] = 1.0f / iscale[k];
        best_error[k] = 0.0f;
        best_iscale[k] = iscale[k];
        best_shift[k] = lo[k];
    }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < lanes; ++k) {
            const float level = (float)clamp_int(nearest_int(iscale[k] * (x[i][k] - lo[k])), 0, nmax);
            float diff = scale[k] * level + lo[k] - x[i][k];
            diff = use_mad ? fabsf(diff) : diff * diff;
            best_error[k] = best_error[k] + w[i][k] * diff;
        }
    for (int step = 0; step <= nstep; ++step) {
        const float numerator = rmin + rdelta * (float)step + (float)nmax;
        for (int k = 0; k < lanes; ++k) {
            iscale[k] = numerator / (hi[k] - lo[k]);
            sum_l[k] = 0.0f; sum_l2[k] = 0.0f; sum_xl[k] = 0.0f; error[k] = 0.0f;
        }
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < lanes; ++k) {
                trial[i][k] = (float)clamp_int(nearest_int(iscale[k] * (x[i][k] - lo[k])), 0, nmax);
                const float weighted = w[i][k] * trial[i][k];
                sum_l[k] = sum_l[k] + weighted;
                sum_l2[k] = sum_l2[k] + weighted * trial[i][k];
                sum_xl[k] = sum_xl[k] + weighted * x[i][k];
            }
        for (int k = 0; k < lanes; ++k) {
            det[k] = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            const float fitted_scale = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / det[k];
            const float fitted_min = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / det[k];
            this_scale[k] = fitted_min > 0 ? sum_xl[k] / sum_l2[k] : fitted_scale;
            this_min[k] = fitted_min > 0 ? 0.0f : fitted_min;
        }
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < lanes; ++k) {
                float diff = this_scale[k] * trial[i][k] + this_min[k] - x[i][k];
                diff = use_mad ? fabsf(diff) : diff * diff;
                error[k] = error[k] + w[i][k] * diff;
            }
        for (int k = 0; k < lanes; ++k) {
            const int better = (det[k] > 0) & (error[k] < best_error[k]);
            best_error[k] = better ? error[k] : best_error[k];
            best_iscale[k] = better ? iscale[k] : best_iscale[k];
            best_shift[k] = better ? lo[k] : best_shift[k];
            scale[k] = better ? this_scale[k] : scale[k];
            lo[k] = better ? this_min[k] : lo[k];
        }
    }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < lanes; ++k) {  /* a flat group: ggml returns before searching, levels 0 */
            const int level = clamp_int(nearest_int(best_iscale[k] * (x[i][k] - best_shift[k])), 0, nmax);
            levels[i][k] = hi[k] == first_lo[k] ? 0.0f : (float)level;
        }
    for (int k = 0; k < lanes; ++k) {
        const int flat = hi[k] == first_lo[k];
        scale_out[k] = flat ? 0.0f : scale[k];
        min_out[k] = flat ? -first_lo[k] : -lo[k];
    }
}

/* make_qx_quants' sums for one trial iscale per lane: sum w x l and sum w l^2 over the group. */
INLINE void qx_sums(int n, int lanes, const lanes_t *x, const lanes_t *weights, const lanes_t *weighted_x,
                    const float *iscale, int nmax, float *sum_lx, float *sum_l2) {
    for (int k = 0; k < lanes; ++k) { sum_lx[k] = 0.0f; sum_l2[k] = 0.0f; }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < lanes; ++k) {
            const float level = (float)clamp_int(nearest_int(iscale[k] * x[i][k]), -nmax, nmax - 1);
            sum_lx[k] = sum_lx[k] + weighted_x[i][k] * level;
            sum_l2[k] = sum_l2[k] + weights[i][k] * level * level;
        }
}

/* make_qx_quants with rmse_type 1 on `lanes` groups: x ~ scale * (level - nmax), levels
 * 0..2*nmax-1, weighted by w (NULL: x*x), best of 19 trial scales. A group's levels follow from
 * its iscale alone, so they are made once at the end from the best iscale. */
INLINE void search_qx(int n, int lanes, const lanes_t *x, const lanes_t *w, int nmax,
                      float *scale_out, lanes_t *levels) {
    lanes_t amax, signed_max, iscale, best_iscale, sum_lx, sum_l2, scale, best;
    lanes_t weights[32], weighted_x[32];  /* w and w * x, the first product of ggml's sums */
    for (int k = 0; k < lanes; ++k) { amax[k] = 0.0f; signed_max[k] = 0.0f; }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < lanes; ++k) {
            const float ax = fabsf(x[i][k]);
            signed_max[k] = ax > amax[k] ? x[i][k] : signed_max[k];
            amax[k] = ax > amax[k] ? ax : amax[k];
            weights[i][k] = w ? w[i][k] : x[i][k] * x[i][k];
            weighted_x[i][k] = weights[i][k] * x[i][k];
        }
    for (int k = 0; k < lanes; ++k) iscale[k] = (float)(-nmax) / signed_max[k];
    qx_sums(n, lanes, x, weights, weighted_x, iscale, nmax, sum_lx, sum_l2);
    for (int k = 0; k < lanes; ++k) {
        scale[k] = sum_l2[k] != 0 ? sum_lx[k] / sum_l2[k] : 0.0f;
        best[k] = scale[k] * sum_lx[k];
        best_iscale[k] = iscale[k];
    }
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        const float numerator = -((float)nmax + 0.1f * (float)step);
        for (int k = 0; k < lanes; ++k) iscale[k] = numerator / signed_max[k];
        qx_sums(n, lanes, x, weights, weighted_x, iscale, nmax, sum_lx, sum_l2);
        for (int k = 0; k < lanes; ++k) {
            const int better = (sum_l2[k] > 0) & (sum_lx[k] * sum_lx[k] > best[k] * sum_l2[k]);
            scale[k] = better ? sum_lx[k] / sum_l2[k] : scale[k];
            best[k] = better ? scale[k] * sum_lx[k] : best[k];
            best_iscale[k] = better ? iscale[k] : best_iscale[k];
        }
    }
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < lanes; ++k) {
            const int level = clamp_int(nearest_int(best_iscale[k] * x[i][k]), -nmax, nmax - 1) + nmax;
            levels[i][k] = amax[k] < GROUP_MAX_EPS ? 0.0f : (float)level;
        }
    for (int k = 0; k < lanes; ++k) scale_out[k] = amax[k] < GROUP_MAX_EPS ? 0.0f : scale[k];
}

/* make_q3_quants with do_rmse (Q3_K without importance) on 16 groups of 16, nmax 4: start from
 * the max-based levels, then up to 5 sweeps that move one level at a time while that raises
 * sum_lx^2 / sum_l2. ggml stops a group after a sweep that changed nothing; such a sweep would
 * change nothing again, so the lanes sweep on until none changed and each ends where ggml's does. */
INLINE void search_q3(const lanes_t *x, float *scale_out, lanes_t *levels) {
    enum { N = 16, NMAX = 4 };
    lanes_t amax, signed_max, iscale, sum_lx, sum_l2;
    for (int k = 0; k < LANES_MAX; ++k) { amax[k] = 0.0f; signed_max[k] = 0.0f; }
    for (int i = 0; i < N; ++i)
        for (int k = 0; k < LANES_MAX; ++k) {
            const float ax = fabsf(x[i][k]);
            signed_max[k] = ax > amax[k] ? x[i][k] : signed_max[k];
            amax[k] = ax > amax[k] ? ax : amax[k];
        }
    for (int k = 0; k < LANES_MAX; ++k) {
        iscale[k] = (float)(-NMAX) / signed_max[k];
        sum_lx[k] = 0.0f; sum_l2[k] = 0.0f;
    }
    for (int i = 0; i < N; ++i)
        for (int k = 0; k < LANES_MAX; ++k) {
            const float level = (float)clamp_int(nearest_int(iscale[k] * x[i][k]), -NMAX, NMAX - 1);
            const float weight = x[i][k] * x[i][k];
            levels[i][k] = level;
            sum_lx[k] = sum_lx[k] + weight * x[i][k] * level;
            sum_l2[k] = sum_l2[k] + weight * level * level;
        }
    for (int sweep = 0; sweep < 5; ++sweep) {
        int changed = 0;
        for (int i = 0; i < N; ++i)
            for (int k = 0; k < LANES_MAX; ++k) {
                const float weight = x[i][k] * x[i][k];
                const float old = levels[i][k];
                const float rest_lx = sum_lx[k] - weight * x[i][k] * old;
                const float rest_l2 = sum_l2[k] - weight * old * old;
                const float level = (float)clamp_int(nearest_int(x[i][k] * rest_l2 / rest_lx), -NMAX, NMAX - 1);
                const float slx = rest_lx + weight * x[i][k] * level;
                const float sl2 = rest_l2 + weight * level * level;
                const int take = (rest_lx > 0) & (level != old) & (sl2 > 0)
                                 & (slx * slx * sum_l2[k] > sum_lx[k] * sum_lx[k] * sl2);
                levels[i][k] = take ? level : old;
                sum_lx[k] = take ? slx : sum_lx[k];
                sum_l2[k] = take ? sl2 : sum_l2[k];
                changed |= take;
            }
        if (!changed) break;
    }
    for (int k = 0; k < LANES_MAX; ++k) {
        const int empty = amax[k] < GROUP_MAX_EPS;
        scale_out[k] = empty ? 0.0f : sum_l2[k] > 0.0f ? sum_lx[k] / sum_l2[k] : 0.0f;
        for (int i = 0; i < N; ++i) levels[i][k] = empty ? 0.0f : levels[i][k] + NMAX;
    }
}

/* make_qp_quants: the block's n group scales (or mins) as levels 0..nmax of one scale, weighted
 * by the groups' importance sums. Scalar (16 values a block); the integer types are ggml's:
 * levels are bytes, so a negative level wraps as it does there. */
static float quantize_scales(int n, int nmax, const float *x, uint8_t *levels, const float *weights) {
    float max = 0.0f;
    for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
    if (max < GROUP_MAX_EPS) {
        memset(levels, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) levels[i] = (uint8_t)nearest_int(iscale * x[i]);
    const float scale = 1.0f / iscale;
    float best_mse = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float diff = x[i] - scale * levels[i];
        best_mse = best_mse + weights[i] * diff * diff;
    }
    for (int step = -4; step <= 4; ++step) {
        if (step == 0) continue;
        const float trial_iscale = (0.1f * (float)step + (float)nmax) / max;
        const float trial_scale = 1.0f / trial_iscale;
        float mse = 0.0f;
        for (int i = 0; i < n; ++i) {
            int level = nearest_int(trial_iscale * x[i]);
            level = level < nmax ? level : nmax;
            const float diff = x[i] - trial_scale * (float)level;
            mse = mse + weights[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = trial_iscale;
        }
    }
    float sum_lx = 0.0f, sum_l2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        int level = nearest_int(iscale * x[i]);
        level = level < nmax ? level : nmax;
        levels[i] = (uint8_t)level;
        sum_lx = sum_lx + weights[i] * x[i] * (float)level;
        sum_l2 = sum_l2 + weights[i] * (float)level * (float)level;
    }
    for (int sweep = 0; sweep < 5; ++sweep) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            const float weight = weights[i];
            float slx = sum_lx - weight * x[i] * levels[i];
            float sl2 = sum_l2 - weight * levels[i] * levels[i];
            if (slx > 0 && sl2 > 0) {
                int level = nearest_int(x[i] * sl2 / slx);
                level = level < nmax ? level : nmax;
                if (level != levels[i]) {
                    slx = slx + weight * x[i] * (float)level;
                    sl2 = sl2 + weight * (float)level * (float)level;
                    if (slx * slx * sum_l2 > sum_lx * sum_lx * sl2) {
                        levels[i] = (uint8_t)level;
                        sum_lx = slx;
                        sum_l2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return sum_l2 > 0.0f ? sum_lx / sum_l2 : 0.0f;
}
