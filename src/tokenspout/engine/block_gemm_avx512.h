/* The GEMM of block_kernels.c on CPUs with AVX-512 VNNI: int16 products, 32 per instruction.
 *
 * Included by block_kernels.c in place of its fp32 GEMM when built with AVX-512 VNNI (the
 * build picks the flags from the CPU); same entry points: PACK_ROWS, packed_floats,
 * panel_floats, pack_rows, fill_panel, multiply_panel.
 *
 * Why: the fp32 GEMM does 8 products per FMA (AVX2), 16 per zmm FMA; VPDPWSSD does 32 int16
 * products and their sums per zmm instruction. x is rounded to int16 per row and block of 32
 * exactly as the block kernels round it (quantize_block: scale max|x| / 32767, exact fp32
 * sum for Q4_1's m term), so the GEMM and the kernels now share one arithmetic for x; the
 * weights' q are small integers (0..15, or -128..127) and need no rounding. A block's
 * integer sum is exact (|15 or 128 * 32767 * 32| < 2^31) and goes to fp32 once per block:
 *   y[m, n] += float(sum_k q[n, k] * xq[m, k]) * (d[n, b] * sx[m, b]) + m[n, b] * sumx[m, b].
 *
 * Layout: x packed per chunk of 16 rows as int32 pairs [K/2][16] (lane j: row j's x[2p],
 * x[2p + 1]), then every chunk's scales [nb][16] and sums [nb][16]; zero rows pad the last
 * chunk. A panel: NR rows of W's q as int16 ([NR][K], read as pairs), then d and m as fp32
 * [NR][nb]. Per pair of k: one load of x, NR broadcasts of a weight pair, NR VPDPWSSD into NR
 * accumulators (16 rows of x each). A row of x has a lane of its own and the same arithmetic
 * whichever rows are beside it. */

#define PACK_ROWS 16

static inline int64_t packed_rows(int64_t M) { return (M + 15) / 16 * 16; }

/* Packed x: pairs, then scales, then sums (see the layout above). */
static inline int64_t packed_floats(int64_t M, int64_t K) {
    return packed_rows(M) * K / 2 + 2 * packed_rows(M) * (K / 32);
}

/* A panel: q pairs [NR][K / 2], then d and m [NR][nb]. */
static inline int64_t panel_floats(int64_t K) { return NR * K / 2 + 2 * NR * (K / 32); }

/* Rows [m0, m0 + 16) of x [M, K] (m0 a multiple of 16) quantised into their chunk of xt. */
static inline void pack_rows(const float *x, int64_t M, int64_t K, int64_t m0, float *xt) {
    const int64_t nb = K / 32, rows = packed_rows(M);
    int32_t *pairs = (int32_t *)xt + m0 * (K / 2);
    float *scale = xt + rows * (K / 2) + m0 * nb, *sum = scale + rows * nb;
    for (int64_t j = 0; j < 16; j++) {
        for (int64_t b = 0; b < nb; b++) {
            int16_t q[32] = {0};
            float s = 0.0f, total = 0.0f;
            if (m0 + j < M) quantize_block(x + (m0 + j) * K + b * 32, q, &s, &total);
            for (int64_t p = 0; p < 16; p++)
                pairs[(b * 16 + p) * 16 + j] = (int32_t)((uint16_t)q[2 * p] |
                                                         ((uint32_t)(uint16_t)q[2 * p + 1] << 16));
            scale[b * 16 + j] = s;
            sum[b * 16 + j] = total;
        }
    }
}

/* The panel: row i holds W's row rows[i] (q as int16, d, m as fp32), or zeros where
 * rows[i] < 0. */
static inline void fill_panel(const BlockWeights *w, const int64_t rows[NR], int64_t K,
                              float *panel) {
    const int64_t nb = K / 32;
    int16_t *q = (int16_t *)panel;
    float *d = panel + NR * K / 2, *m = d + NR * nb;
    for (int i = 0; i < NR; i++) {
        int16_t *qi = q + i * K;
        const int64_t n = rows[i];
        if (n < 0) {
            for (int64_t k = 0; k < K; k++) qi[k] = 0;
            for (int64_t b = 0; b < nb; b++) d[i * nb + b] = m[i * nb + b] = 0.0f;
            continue;
        }
        if (w->m) { /* a pair of blocks unpacks as the rows take it; back to k's order */
            const uint8_t *qn = (const uint8_t *)w->qs + n * nb * 16;
            int64_t b = 0;
            for (; b + 2 <= nb; b += 2) {
                __m512i pair[2]; /* [b 0-15 | b+1 0-15], [b 16-31 | b+1 16-31] */
                q4_1_pair(qn, b, pair);
                _mm512_storeu_si512(qi + b * 32, _mm512_shuffle_i64x2(pair[0], pair[1], 0x44));
                _mm512_storeu_si512(qi + b * 32 + 32,
                                    _mm512_shuffle_i64x2(pair[0], pair[1], 0xEE));
            }
            if (b < nb) _mm512_storeu_si512(qi + b * 32, q4_1_single(qn, b));
        } else {
            const int8_t *qn = (const int8_t *)w->qs + n * K;
            for (int64_t b = 0; b < nb; b++) _mm512_storeu_si512(qi + b * 32, q8_0_single(qn, b));
        }
        for (int64_t b0 = 0; b0 < nb; b0 += 64) {
            const int64_t bn = nb - b0 < 64 ? nb - b0 : 64;
            halves(w->d + n * nb + b0, bn, d + i * nb + b0);
            if (w->m)
                halves(w->m + n * nb + b0, bn, m + i * nb + b0);
            else
                for (int64_t b = 0; b < bn; b++) m[i * nb + b0 + b] = 0.0f;
        }
    }
}

/* The panel's NR rows against one chunk of packed x -> out[NR][16], fetching ``ahead`` (when
 * not NULL) as it goes. has_m: Q4_1 (a literal at each call site; Q8_0's m term is skipped,
 * not multiplied by zero). */
static inline __attribute__((always_inline)) void vnni_tile(const float *panel, int64_t K,
                                                            const int32_t *xq, const float *xs,
                                                            const float *xsum, const int has_m,
                                                            const Ahead *ahead,
                                                            float out[NR][16]) {
    const int64_t nb = K / 32, half = K / 2;
    const int32_t *wq = (const int32_t *)panel;
    const float *d = panel + NR * half, *m = d + NR * nb;
    __m512 f[NR];
    for (int i = 0; i < NR; i++) f[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i a[NR];
        for (int i = 0; i < NR; i++) a[i] = _mm512_setzero_si512();
        if (ahead) fetch_part(ahead, b, nb);
        for (int64_t p = b * 16; p < b * 16 + 16; p++) {
            const __m512i xv = _mm512_loadu_si512(xq + p * 16);
            for (int i = 0; i < NR; i++)
                a[i] = _mm512_dpwssd_epi32(a[i], _mm512_set1_epi32(wq[i * half + p]), xv);
        }
        const __m512 s = _mm512_loadu_ps(xs + b * 16);
        for (int i = 0; i < NR; i++)
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i]),
                                   _mm512_mul_ps(s, _mm512_set1_ps(d[i * nb + b])), f[i]);
        if (has_m) {
            const __m512 sm = _mm512_loadu_ps(xsum + b * 16);
            for (int i = 0; i < NR; i++)
                f[i] = _mm512_fmadd_ps(sm, _mm512_set1_ps(m[i * nb + b]), f[i]);
        }
    }
    for (int i = 0; i < NR; i++) _mm512_storeu_ps(out[i], f[i]);
}

/* The panel against every chunk of the packed x, written as the fp32 GEMM writes them:
 * plain, y[m, n0 + i] for i < rows; swiglu, rows 0..NR/2 are gate rows and the rest the
 * matching up rows, y[m, n0 + i] = silu(gate) * up. The first chunk fetches ``ahead``. */
static inline void multiply_panel(const float *panel, const float *xt, int64_t M, int64_t K,
                                  int64_t n0, int64_t rows, int64_t N, float *y,
                                  const BlockWeights *w, const int swiglu, const Ahead *ahead) {
    const int has_m = w->m != NULL;
    const int64_t nb = K / 32, chunks = packed_rows(M);
    const float *scales = xt + chunks * (K / 2), *sums = scales + chunks * nb;
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
        float out[NR][16];
        const int32_t *xq = (const int32_t *)xt + m0 * (K / 2);
        const Ahead *fetch = m0 == 0 ? ahead : NULL;
        if (has_m)
            vnni_tile(panel, K, xq, scales + m0 * nb, sums + m0 * nb, 1, fetch, out);
        else
            vnni_tile(panel, K, xq, scales + m0 * nb, sums + m0 * nb, 0, fetch, out);
        if (swiglu) {
            for (int64_t i = 0; i < rows; i++)
                for (int h = 0; h < 2; h++)
                    _mm256_storeu_ps(out[i] + 8 * h,
                                     silu_times(_mm256_loadu_ps(out[i] + 8 * h),
                                                _mm256_loadu_ps(out[NR / 2 + i] + 8 * h)));
        }
        const int64_t width = M - m0 < 16 ? M - m0 : 16;
        for (int64_t j = 0; j < width; j++)
            for (int64_t i = 0; i < rows; i++) y[(m0 + j) * N + n0 + i] = out[i][j];
    }
}
