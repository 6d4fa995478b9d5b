/* The block kernels' rows (q4_1_row, q8_0_row) on CPUs with AVX-512 VNNI: two blocks of 32
 * weights per instruction.
 *
 * Included by block_kernels.c in place of its AVX2 rows when built with AVX-512 VNNI. The
 * AVX2 rows spend ~10 instructions per block and row of x (two VPMADDWD of 16 products, an
 * add, a conversion, the scale's broadcast and product, an FMA); here a pair of blocks takes
 * two VPDPWSSD of 32 products, a conversion, the pair's scales and an FMA. At one token a
 * decode step reads 94 MB of weights, which this machine kind streams in ~3.7 ms, and the
 * AVX2 rows took ~5.7 ms: the step was bound by instructions, not memory.
 *
 * Layout: the rows of x as quantize_block leaves them, then each whole pair of blocks
 * reordered by pair_blocks as [first 0-15 | second 0-15 | first 16-31 | second 16-31], the
 * order in which a Q4_1 pair's 32 bytes unpack (low nibbles: weights 0-15 of each block;
 * high: 16-31). A last, odd block stays as it was. The int32 lanes 0-7 of a pair's products
 * then belong to its first block and 8-15 to its second, each scaled by its own d * scale. */

/* [d[0] * s[0] x 8 | d[1] * s[1] x 8]: a pair of blocks' scales (d fp16, s fp32). */
static inline __m512 pair_scale(const uint16_t *d, const float *s) {
    const __m128 both = _mm_mul_ps(_mm_cvtph_ps(_mm_loadu_si32(d)),
                                   _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)s)));
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(both));
}

/* Q4_1 blocks b and b + 1 as int16: [b 0-15 | b+1 0-15] and [b 16-31 | b+1 16-31]. */
static inline void q4_1_pair(const uint8_t *qn, int64_t b, __m512i w[2]) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(qn + b * 16)));
    w[0] = _mm512_and_si512(bytes, _mm512_set1_epi16(0x0F));
    w[1] = _mm512_srli_epi16(bytes, 4);
}

/* Q8_0 blocks b and b + 1 in the same order. */
static inline void q8_0_pair(const int8_t *qn, int64_t b, __m512i w[2]) {
    const __m256i first = _mm256_loadu_si256((const __m256i *)(qn + b * 32));
    const __m256i second = _mm256_loadu_si256((const __m256i *)(qn + b * 32 + 32));
    w[0] = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(first, second, 0x20));
    w[1] = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(first, second, 0x31));
}

/* One block b's 32 weights in their natural order (the odd block at a row's end). */
static inline __m512i q4_1_single(const uint8_t *qn, int64_t b) {
    __m256i w[2];
    q4_1_block(qn, b, w);
    return _mm512_inserti64x4(_mm512_castsi256_si512(w[0]), w[1], 1);
}

static inline __m512i q8_0_single(const int8_t *qn, int64_t b) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qn + b * 32)));
}

/* One output row of W against ``rows`` rows of quantised x (a literal at each call site, so
 * the accumulators stay in registers), a pair of blocks at a time. */
#define ROW_BODY(PAIR_FN, SINGLE_FN, BLOCK_BYTES)                                          \
    __m512 acc[ROWS];                                                                      \
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();                           \
    int64_t b = 0;                                                                         \
    for (; b + 2 <= nb; b += 2) {                                                          \
        _mm_prefetch((const char *)(qn + b * BLOCK_BYTES) + PREFETCH, _MM_HINT_T0);        \
        __m512i w[2];                                                                      \
        PAIR_FN(qn, b, w);                                                                 \
        for (int r = 0; r < rows; r++) {                                                   \
            const int64_t xb = r * nb + b;                                                 \
            __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[0],                  \
                                            _mm512_loadu_si512(xq + xb * 32));             \
            a = _mm512_dpwssd_epi32(a, w[1], _mm512_loadu_si512(xq + xb * 32 + 32));       \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), pair_scale(dn + b, xs + xb),   \
                                     acc[r]);                                              \
        }                                                                                  \
    }                                                                                      \
    if (b < nb) {                                                                          \
        const __m512i w = SINGLE_FN(qn, b);                                                \
        for (int r = 0; r < rows; r++) {                                                   \
            const int64_t xb = r * nb + b;                                                 \
            const __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w,               \
                                                  _mm512_loadu_si512(xq + xb * 32));       \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a),                                \
                                     _mm512_set1_ps(half1(dn[b]) * xs[xb]), acc[r]);       \
        }                                                                                  \
    }

/* ROW_BODY for Q4_1, plus the m term of each block: m * (the x block's exact sum). */
static inline __attribute__((always_inline)) void q4_1_row(
    const uint8_t *qn, const uint16_t *dn, const uint16_t *mn, int64_t nb, const int16_t *xq,
    const float *xs, const float *xsum, const int rows, float out[ROWS]) {
    ROW_BODY(q4_1_pair, q4_1_single, 16)
    for (int r = 0; r < rows; r++)
        out[r] = _mm512_reduce_add_ps(acc[r]) + dot_half(mn, xsum + r * nb, nb);
}

static inline __attribute__((always_inline)) void q8_0_row(
    const int8_t *qn, const uint16_t *dn, int64_t nb, const int16_t *xq, const float *xs,
    const int rows, float out[ROWS]) {
    ROW_BODY(q8_0_pair, q8_0_single, 32)
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
