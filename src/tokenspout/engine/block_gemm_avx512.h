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

/* W's row n's block scales as fp32: d into d_row, and Q4_1's m into m_row (Q8_0 has none:
 * the tiles skip its m term). */
static inline void row_scales(const BlockWeights *w, int64_t n, int64_t nb, float *d_row,
                              float *m_row) {
    for (int64_t b0 = 0; b0 < nb; b0 += 64) {
        const int64_t bn = nb - b0 < 64 ? nb - b0 : 64;
        halves(w->d + n * nb + b0, bn, d_row + b0);
        if (w->m) halves(w->m + n * nb + b0, bn, m_row + b0);
    }
}

/* The panel: row i holds W's row rows[i] (q as int16, d, m as fp32), or zeros where
 * rows[i] < 0. */
static inline void fill_panel16(const BlockWeights *w, const int64_t rows[NR], int64_t K,
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
        row_scales(w, n, nb, d + i * nb, m + i * nb);
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

/* ---- int8 x: the GEMMs of decode steps (decode_layers) --------------------------------------
 *
 * Why: VPDPBUSD does 64 products (unsigned bytes by signed bytes) per instruction, twice
 * VPDPWSSD's 32, and Q4_1's q (0..15) are bytes already. x is rounded per row and block of 32
 * to int8 with the scale max|x| / 127, as llama.cpp rounds it: 256x coarser than int16. Only
 * decode steps take it. A prompt's last row gives the answer's first token, and int8 there
 * moved this model's greedy answer to "What is the capital of France?" off Paris; in decode
 * steps alone it kept Paris, and teacher-forced top-1 agreement with the fp32 reference is in
 * RESULTS.md. Q8_0's q are signed (the LM head): x goes in as x + 128, unsigned, and the
 * block's 128 * sum(q) comes off its sum, exactly (both < 2^24, so exact in fp32 too).
 *
 * Layout: x per chunk of 16 rows as int32 quads [K/4][16] (lane j: row j's x[4p .. 4p + 3]),
 * then scales and sums (of the rounded values) [nb][16] as above. A panel: NR rows of q as bytes [NR][K] (read as
 * quads), then d and c as fp32 [NR][nb], c being m for Q4_1 and 128 * sum(q) for Q8_0. Both
 * take less room than the int16 layouts, whose sizes the scratch is allocated for. */

/* One block of 32 floats -> int8 q with the scale max|x| / 127 (to nearest), and the sum of
 * the rounded values (scale * sum(q), exact in integers): Q4_1's m term taken on the rounded
 * x, as its q * d term is, so that the block's weights q * d + m meet one x. With the exact
 * sum instead (as the int16 rounding has it), the errors of the two terms did not cancel, and
 * the teacher-forced check's agreement fell from 156 to 149 of 160. */
static inline void quantize_block8(const float *xb, int8_t *q, float *scale, float *sum) {
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qhi));
    *scale = amax / 127.0f;
    *sum = *scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
}

/* The panel of int8 tiles: row i holds W's row rows[i] (q as bytes in k's order, d and c as
 * fp32), or zeros where rows[i] < 0. */
static inline void fill_panel8(const BlockWeights *w, const int64_t rows[NR], int64_t K,
                               float *panel) {
    const int64_t nb = K / 32;
    int8_t *q = (int8_t *)panel;
    float *d = panel + NR * K / 4, *c = d + NR * nb;
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int i = 0; i < NR; i++) {
        int8_t *qi = q + i * K;
        const int64_t n = rows[i];
        if (n < 0) {
            for (int64_t k = 0; k < K; k++) qi[k] = 0;
            for (int64_t b = 0; b < nb; b++) d[i * nb + b] = c[i * nb + b] = 0.0f;
            continue;
        }
        if (w->m) { /* byte j of a block: weight j in its low nibble, j + 16 in its high one */
            const uint8_t *qn = (const uint8_t *)w->qs + n * nb * 16;
            for (int64_t b = 0; b < nb; b++) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(qn + b * 16));
                _mm_storeu_si128((__m128i *)(qi + b * 32), _mm_and_si128(v, low));
                _mm_storeu_si128((__m128i *)(qi + b * 32 + 16),
                                 _mm_and_si128(_mm_srli_epi16(v, 4), low));
            }
        } else {
            const int8_t *qn = (const int8_t *)w->qs + n * K;
#ifdef __AMX_INT8__
            /* Q8_0's q are the A tile's bytes already: the tiles of a full panel load them
             * from W's rows (amx_rows), and the tiles multiply signed by signed, with no
             * x + 128 to take off */
            if (rows[NR - 1] < 0)
                for (int64_t b = 0; b < nb; b++)
                    _mm256_storeu_si256((__m256i *)(qi + b * 32),
                                        _mm256_loadu_si256((const __m256i *)(qn + b * 32)));
#else
            for (int64_t b = 0; b < nb; b++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qn + b * 32));
                _mm256_storeu_si256((__m256i *)(qi + b * 32), v);
                const __m512i wide = _mm512_cvtepi8_epi16(v);
                c[i * nb + b] = 128.0f * (float)_mm512_reduce_add_epi32(_mm512_madd_epi16(
                                             wide, _mm512_set1_epi16(1)));
            }
#endif
        }
        row_scales(w, n, nb, d + i * nb, c + i * nb);
    }
}

/* vnni_tile with int8 x: the panel's NR rows against one chunk -> out[NR][16]. has_m: Q4_1
 * (q unsigned, x signed), else Q8_0 (x + 128 unsigned, q signed, c taken off). */
static inline __attribute__((always_inline)) void vnni_tile8(const float *panel, int64_t K,
                                                             const int32_t *xq, const float *xs,
                                                             const float *xsum, const int has_m,
                                                             const Ahead *ahead,
                                                             float out[NR][16]) {
    const int64_t nb = K / 32, quarter = K / 4;
    const int32_t *wq = (const int32_t *)panel;
    const float *d = panel + NR * quarter, *c = d + NR * nb;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 f[NR];
    for (int i = 0; i < NR; i++) f[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i a[NR];
        for (int i = 0; i < NR; i++) a[i] = _mm512_setzero_si512();
        if (ahead) fetch_part(ahead, b, nb);
        for (int64_t p = b * 8; p < b * 8 + 8; p++) {
            const __m512i xv = _mm512_loadu_si512(xq + p * 16);
            if (has_m) {
                for (int i = 0; i < NR; i++)
                    a[i] = _mm512_dpbusd_epi32(a[i], _mm512_set1_epi32(wq[i * quarter + p]), xv);
            } else {
                const __m512i xu = _mm512_xor_si512(xv, flip);
                for (int i = 0; i < NR; i++)
                    a[i] = _mm512_dpbusd_epi32(a[i], xu, _mm512_set1_epi32(wq[i * quarter + p]));
            }
        }
        const __m512 s = _mm512_loadu_ps(xs + b * 16);
        for (int i = 0; i < NR; i++) {
            __m512 total = _mm512_cvtepi32_ps(a[i]);
            if (!has_m) total = _mm512_sub_ps(total, _mm512_set1_ps(c[i * nb + b]));
            f[i] = _mm512_fmadd_ps(total, _mm512_mul_ps(s, _mm512_set1_ps(d[i * nb + b])), f[i]);
        }
        if (has_m) {
            const __m512 sm = _mm512_loadu_ps(xsum + b * 16);
            for (int i = 0; i < NR; i++)
                f[i] = _mm512_fmadd_ps(sm, _mm512_set1_ps(c[i * nb + b]), f[i]);
        }
    }
    for (int i = 0; i < NR; i++) _mm512_storeu_ps(out[i], f[i]);
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
/* ---- int8 x in AMX tiles (the avx512-amx build) --------------------------------------------
 *
 * Why: on a CPU with AMX, one TDPBUSD multiplies a tile of NR rows of W by a block of 16 rows
 * of x, 32 x 16 x NR products, where vnni_tile8 spends 8 VPDPBUSD and 8 broadcasts per row
 * of W and block. The packed x is already the B tile's layout (quads [K/4][16]) and a panel's
 * q bytes [NR][K] the A tile's, so only the multiply changes: a block's integer sums go to
 * memory from the tile and get vnni_tile8's very same fp32 scaling, so each output has the
 * same bits as in the avx512-vnni build (Q8_0: TDPBSSD, signed by signed, gives the sum
 * that build computes as (x + 128) * q - 128 * sum(q), exactly). The tiles' shapes are
 * loaded per thread at the start of each GEMM (amx_begin) and released at its end: torch's
 * oneDNN loads its own into the same threads between our calls. */
#define AMX_INT8
/* The tiles (numbers, not expressions: the intrinsics paste them into the assembly): the
 * sums of two blocks, their W rows, their x. */
#define AMX_ACC 0
#define AMX_ACC1 1
#define AMX_W 2
#define AMX_W1 3
#define AMX_X 4
#define AMX_X1 5

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileShapes;

static inline void amx_begin(void) {
    TileShapes shapes = {0};
    shapes.palette = 1;
    for (int t = 0; t < 2; t++) {
        shapes.rows[AMX_ACC + t] = NR, shapes.colsb[AMX_ACC + t] = 64; /* [NR][16] int32 */
        shapes.rows[AMX_W + t] = NR, shapes.colsb[AMX_W + t] = 32;     /* [NR][32] bytes */
        shapes.rows[AMX_X + t] = 8, shapes.colsb[AMX_X + t] = 64;      /* [8][16] quads */
    }
    _tile_loadconfig(&shapes);
}

static inline void amx_end(void) { _tile_release(); }

/* Where the tiles load a Q8_0 panel's q from: W's own rows [n0, n0 + NR) when the panel is
 * full (fill_panel8 then copies none), else the panel. */
static inline const int8_t *amx_rows(const float *panel, const BlockWeights *w, int64_t n0,
                                     int64_t rows, int64_t K) {
    return rows == NR ? (const int8_t *)w->qs + n0 * K : (const int8_t *)panel;
}

/* Blocks b0 and b0 + 1 (when two) of the panel's NR rows against one chunk of x: their
 * integer sums into sums[0] and sums[1]. */
static inline __attribute__((always_inline)) void amx_sums(const int8_t *wq, const int32_t *xq,
                                                           int64_t K, int64_t b0, const int two,
                                                           const int has_m,
                                                           int32_t sums[2][NR][16]) {
    _tile_zero(AMX_ACC);
    _tile_loadd(AMX_W, wq + b0 * 32, K);
    _tile_loadd(AMX_X, xq + b0 * 128, 64);
    if (has_m)
        _tile_dpbusd(AMX_ACC, AMX_W, AMX_X);
    else
        _tile_dpbssd(AMX_ACC, AMX_W, AMX_X);
    if (two) {
        _tile_zero(AMX_ACC1);
        _tile_loadd(AMX_W1, wq + b0 * 32 + 32, K);
        _tile_loadd(AMX_X1, xq + b0 * 128 + 128, 64);
        if (has_m)
            _tile_dpbusd(AMX_ACC1, AMX_W1, AMX_X1);
        else
            _tile_dpbssd(AMX_ACC1, AMX_W1, AMX_X1);
    }
    _tile_stored(AMX_ACC, sums[0], 64);
    if (two) _tile_stored(AMX_ACC1, sums[1], 64);
}

/* vnni_tile8 in tiles: the panel's NR rows (their q at wq, rows K bytes apart: the panel's,
 * or amx_rows') against one chunk of x -> out[NR][16]. Blocks go to the tiles two at a time,
 * and a pair's sums are scaled after the next pair's tiles are issued, so that the vector
 * unit scales while the tiles multiply: a batch-16 step took 0.95x the time it took scaling
 * each pair as soon as it was stored (benchmarks/step_ab.py). */
static inline __attribute__((always_inline)) void amx_tile8(const float *panel,
                                                            const int8_t *wq, int64_t K,
                                                            const int32_t *xq, const float *xs,
                                                            const float *xsum, const int has_m,
                                                            const Ahead *ahead,
                                                            float out[NR][16]) {
    const int64_t nb = K / 32;
    const float *d = panel + NR * K / 4, *c = d + NR * nb;
    int32_t sums[2][2][NR][16] __attribute__((aligned(64))); /* [pair parity][block] */
    __m512 f[NR];
    for (int i = 0; i < NR; i++) f[i] = _mm512_setzero_ps();
    amx_sums(wq, xq, K, 0, nb > 1, has_m, sums[0]);
    for (int64_t b0 = 0; b0 < nb; b0 += 2) {
        if (b0 + 2 < nb) amx_sums(wq, xq, K, b0 + 2, b0 + 3 < nb, has_m, sums[(b0 / 2 + 1) & 1]);
        for (int64_t b = b0; b < b0 + 2 && b < nb; b++) {
            const int32_t(*block)[16] = sums[(b0 / 2) & 1][b - b0];
            if (ahead) fetch_part(ahead, b, nb);
            const __m512 s = _mm512_loadu_ps(xs + b * 16);
            for (int i = 0; i < NR; i++) {
                const __m512 total = _mm512_cvtepi32_ps(_mm512_load_si512(block[i]));
                f[i] = _mm512_fmadd_ps(total, _mm512_mul_ps(s, _mm512_set1_ps(d[i * nb + b])),
                                       f[i]);
            }
            if (has_m) {
                const __m512 sm = _mm512_loadu_ps(xsum + b * 16);
                for (int i = 0; i < NR; i++)
                    f[i] = _mm512_fmadd_ps(sm, _mm512_set1_ps(c[i * nb + b]), f[i]);
            }
        }
    }
    for (int i = 0; i < NR; i++) _mm512_storeu_ps(out[i], f[i]);
}
#endif

/* Rows [m0, m0 + 16) of x [M, K] (m0 a multiple of 16) rounded to int8 or int16 into their
 * chunk of xt: a block's 32 values are 8 or 16 int32 words (quads or pairs), word p of row j
 * at [b][p][j]. */
static inline void pack_rows(const float *x, int64_t M, int64_t K, int64_t m0, float *xt,
                             const int int8) {
    const int64_t nb = K / 32, rows = packed_rows(M), words = int8 ? 8 : 16;
    int32_t *packed = (int32_t *)xt + m0 * nb * words;
    float *scale = xt + rows * nb * words + m0 * nb, *sum = scale + rows * nb;
    for (int64_t j = 0; j < 16; j++) {
        for (int64_t b = 0; b < nb; b++) {
            int32_t q[16] = {0}; /* the block as 32 int8 or int16 values */
            float s = 0.0f, total = 0.0f;
            const float *xb = x + (m0 + j) * K + b * 32;
            if (m0 + j < M && int8)
                quantize_block8(xb, (int8_t *)q, &s, &total);
            else if (m0 + j < M)
                quantize_block(xb, (int16_t *)q, &s, &total);
            for (int64_t p = 0; p < words; p++) packed[(b * words + p) * 16 + j] = q[p];
            scale[b * 16 + j] = s;
            sum[b * 16 + j] = total;
        }
    }
}

/* The panel for int8 tiles or int16 ones. */
static inline void fill_panel(const BlockWeights *w, const int64_t rows[NR], int64_t K,
                              float *panel, const int int8) {
    if (int8)
        fill_panel8(w, rows, K, panel);
    else
        fill_panel16(w, rows, K, panel);
}

/* The panel against every chunk of the packed x (int8 or int16, as packed and filled),
 * written as the fp32 GEMM writes them: plain, y[m, n0 + i] for i < rows; swiglu, rows
 * 0..NR/2 are gate rows and the rest the matching up rows, y[m, n0 + i] = silu(gate) * up.
 * The first chunk fetches ``ahead``. */
static inline void multiply_panel(const float *panel, const float *xt, int64_t M, int64_t K,
                                  int64_t n0, int64_t rows, int64_t N, float *y,
                                  const BlockWeights *w, const int swiglu, const Ahead *ahead,
                                  const int int8) {
    const int has_m = w->m != NULL;
    const int64_t nb = K / 32, chunks = packed_rows(M), per_row = int8 ? K / 4 : K / 2;
    const float *scales = xt + chunks * per_row, *sums = scales + chunks * nb;
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
        float out[NR][16];
        const int32_t *xq = (const int32_t *)xt + m0 * per_row;
        const float *xs = scales + m0 * nb, *xsum = sums + m0 * nb;
        const Ahead *fetch = m0 == 0 ? ahead : NULL;
#ifdef AMX_INT8
        if (int8 && has_m)
            amx_tile8(panel, (const int8_t *)panel, K, xq, xs, xsum, 1, fetch, out);
        else if (int8)
            amx_tile8(panel, amx_rows(panel, w, n0, rows, K), K, xq, xs, xsum, 0, fetch, out);
#else
        if (int8 && has_m)
            vnni_tile8(panel, K, xq, xs, xsum, 1, fetch, out);
        else if (int8)
            vnni_tile8(panel, K, xq, xs, xsum, 0, fetch, out);
#endif
        else if (has_m)
            vnni_tile(panel, K, xq, xs, xsum, 1, fetch, out);
        else
            vnni_tile(panel, K, xq, xs, xsum, 0, fetch, out);
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
