/* Matmuls on llama.cpp's block-quantised weights (Q4_1, Q8_0), AVX2, for the embedded engine
 * on CPUs where PyTorch has no fast low-bit kernel.
 *
 * Why hand-written (benchmarks/block_kernels.py, RESULTS.md): on an AVX2-only CPU, torch's
 * int8 and int4 weight-only kernels run 10-100x slower than fbgemm's fp16 GEMM, and a
 * batch-1 decode step with fp16 weights is bound by reading 268 MB of weights per token.
 * The GGUF's own 4-bit blocks are 4x fewer bytes, and integer multiply-adds do 32
 * products per instruction where fp32 FMAs do 8.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T, x and y fp32 row-major, K a multiple of 32. W is stored
 * per output row as K/32 blocks of 32 weights:
 *   Q4_1: w = q * d + m, q in 0..15; qs[N, K/2] (byte j of a block holds weight j in its
 *         low nibble and weight j + 16 in its high one, as in GGUF), d, m fp32 [N, K/32].
 *   Q8_0: w = q * d, q int8; qs[N, K], d fp32 [N, K/32].
 * x is quantised on the way in, per row and block of 32, to int16 with the scale
 * max|x| / 32767 (round to nearest), and the block's exact fp32 sum is kept for Q4_1's ``m``
 * term. The products are exact integers; the error is that of x's rounding, under 2e-5 of
 * the block's largest value. (llama.cpp rounds x to int8, 256x coarser: on this 135M model
 * that moved the greedy answer to "What is the capital of France?" off Paris, and top-1
 * agreement with the fp32 reference fell to 150 of 160 steps.)
 *
 * Threads: OpenMP over output rows. The library is linked against the libgomp PyTorch has
 * already loaded (same soname), so it shares torch's thread pool and its thread count.
 */
#include <immintrin.h>
#include <stdint.h>

#include <math.h>
#include <stdlib.h>

/* Rows of x processed together, so that each unpacked weight block serves several rows. */
#define ROWS 4

/* x quantised per row and block of 32: q [M, K] int16, scale and exact sum [M, K/32]. */
typedef struct {
    int16_t *q;
    float *scale, *sum;
} QuantizedX;

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static int quantize_x(const float *x, int64_t M, int64_t K, QuantizedX *out) {
    const int64_t nb = K / 32;
    out->q = malloc(M * K * sizeof(int16_t));
    out->scale = malloc(M * nb * sizeof(float));
    out->sum = malloc(M * nb * sizeof(float));
    if (!out->q || !out->scale || !out->sum) return -1;
    const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t i = 0; i < M * nb; i++) {
        const float *xb = x + i * 32;
        __m256 v[4];
        for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(xb + 8 * j);
        const __m256 amax4 = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        const float amax = hmax(amax4);
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
        __m256i q[4];
        for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
        for (int h = 0; h < 2; h++) {
            /* packs_epi32 interleaves the 128-bit lanes of its inputs; 0xD8 restores order */
            const __m256i q16 = _mm256_permute4x64_epi64(
                _mm256_packs_epi32(q[2 * h], q[2 * h + 1]), 0xD8);
            _mm256_storeu_si256((__m256i *)(out->q + i * 32 + 16 * h), q16);
        }
        out->scale[i] = amax / 32767.0f;
        out->sum[i] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
    return 0;
}

static void free_x(QuantizedX *qx) {
    free(qx->q);
    free(qx->scale);
    free(qx->sum);
}


/* sum over a block of w * x, 32 int16 each as two halves, in 8 int32 lanes, as floats. */
static inline __m256 dot_block(const __m256i w[2], const int16_t *x) {
    const __m256i lo = _mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)x));
    const __m256i hi = _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(x + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)); /* |15 or 127 * 32767 * 4| fits */
}

/* sum(a[i] * b[i]) for i < n */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Q4_1 block b's 32 weights q as int16: weights 0-15 (low nibbles), then 16-31. */
static inline void q4_1_block(const uint8_t *qn, int64_t b, __m256i w[2]) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128((const __m128i *)(qn + b * 16));
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
}

/* Q8_0 block b's 32 weights as int16. */
static inline void q8_0_block(const int8_t *qn, int64_t b, __m256i w[2]) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qn + b * 32)));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qn + b * 32 + 16)));
}

/* One output row of W against ``rows`` rows of quantised x (a literal at each call site, so
 * the accumulators stay in registers). Blocks go in pairs with one accumulator each, so
 * that consecutive blocks' FMAs do not wait on each other's latency. */
#define ROW_BODY(BLOCK_FN)                                                                 \
    __m256 acc0[ROWS], acc1[ROWS];                                                         \
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();               \
    int64_t b = 0;                                                                         \
    for (; b + 2 <= nb; b += 2) {                                                          \
        __m256i w0[2], w1[2];                                                              \
        BLOCK_FN(qn, b, w0);                                                               \
        BLOCK_FN(qn, b + 1, w1);                                                           \
        for (int r = 0; r < rows; r++) {                                                   \
            const int64_t xb = r * nb + b;                                                 \
            acc0[r] = _mm256_fmadd_ps(dot_block(w0, xq + xb * 32),                         \
                                      _mm256_set1_ps(dn[b] * xs[xb]), acc0[r]);            \
            acc1[r] = _mm256_fmadd_ps(dot_block(w1, xq + (xb + 1) * 32),                   \
                                      _mm256_set1_ps(dn[b + 1] * xs[xb + 1]), acc1[r]);    \
        }                                                                                  \
    }                                                                                      \
    if (b < nb) {                                                                          \
        __m256i w0[2];                                                                     \
        BLOCK_FN(qn, b, w0);                                                               \
        for (int r = 0; r < rows; r++) {                                                   \
            const int64_t xb = r * nb + b;                                                 \
            acc0[r] = _mm256_fmadd_ps(dot_block(w0, xq + xb * 32),                         \
                                      _mm256_set1_ps(dn[b] * xs[xb]), acc0[r]);            \
        }                                                                                  \
    }

/* One output row of W against ``rows`` rows of quantised x (a literal at each call site, so
 * the accumulators stay in registers). Blocks go in pairs with one accumulator each, so
 * that consecutive blocks' FMAs do not wait on each other's latency. */
static inline __attribute__((always_inline)) void q4_1_row(
    const uint8_t *qn, const float *dn, const float *mn, int64_t nb, const int16_t *xq,
    const float *xs, const float *xsum, const int rows, float out[ROWS]) {
    ROW_BODY(q4_1_block)
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + dot_f32(mn, xsum + r * nb, nb);
}

static inline __attribute__((always_inline)) void q8_0_row(
    const int8_t *qn, const float *dn, int64_t nb, const int16_t *xq, const float *xs,
    const int rows, float out[ROWS]) {
    ROW_BODY(q8_0_block)
    for (int r = 0; r < rows; r++) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

/* The body of a block linear: x quantised once, then in parallel over output rows n, for each
 * group of up to ROWS rows of x, ROW_CALL(rows) with rows a literal 1..4 (it reads n, nb, xq,
 * xs, xsum and writes out). Returns 0, or -1 when memory for the quantised x could not be
 * allocated. */
#define BLOCK_LINEAR(ROW_CALL)                                                             \
    const int64_t nb = K / 32;                                                             \
    QuantizedX qx;                                                                         \
    if (quantize_x(x, M, K, &qx) != 0) {                                                   \
        free_x(&qx);                                                                       \
        return -1;                                                                         \
    }                                                                                      \
    _Pragma("omp parallel for schedule(static)")                                           \
    for (int64_t n = 0; n < N; n++) {                                                      \
        for (int64_t r0 = 0; r0 < M; r0 += ROWS) {                                         \
            const int16_t *xq = qx.q + r0 * K;                                             \
            const float *xs = qx.scale + r0 * nb, *xsum = qx.sum + r0 * nb;                \
            float out[ROWS];                                                               \
            const int64_t rows = M - r0 < ROWS ? M - r0 : ROWS;                            \
            switch (rows) {                                                                \
            case 1: ROW_CALL(1); break;                                                    \
            case 2: ROW_CALL(2); break;                                                    \
            case 3: ROW_CALL(3); break;                                                    \
            default: ROW_CALL(4); break;                                                   \
            }                                                                              \
            (void)xsum;                                                                    \
            for (int64_t r = 0; r < rows; r++) y[(r0 + r) * N + n] = out[r];               \
        }                                                                                  \
    }                                                                                      \
    free_x(&qx);                                                                           \
    return 0;

int q4_1_linear(const float *x, int64_t M, int64_t K, const uint8_t *qs, const float *d,
                const float *m, int64_t N, float *y) {
#define Q4_CALL(R) \
    q4_1_row(qs + n * (K / 2), d + n * nb, m + n * nb, nb, xq, xs, xsum, R, out)
    BLOCK_LINEAR(Q4_CALL)
#undef Q4_CALL
}

int q8_0_linear(const float *x, int64_t M, int64_t K, const int8_t *qs, const float *d,
                int64_t N, float *y) {
#define Q8_CALL(R) q8_0_row(qs + n * K, d + n * nb, nb, xq, xs, R, out)
    BLOCK_LINEAR(Q8_CALL)
#undef Q8_CALL
}

/* x += delta (when delta is not NULL), then out = x / rms(x) * w, per row of H; fp32. The
 * residual add and RMSNorm of every layer in one call: F.rms_norm on CPU is six ops of a few
 * microseconds each at batch 1, and a decode step has 61 of them. */
void add_rms_norm(float *x, const float *delta, int64_t M, int64_t H, const float *w,
                  float eps, float *out) {
    for (int64_t i = 0; i < M; i++) {
        float *xr = x + i * H;
        float *o = out + i * H;
        __m256 ss = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= H; j += 8) {
            __m256 v = _mm256_loadu_ps(xr + j);
            if (delta) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(delta + i * H + j));
                _mm256_storeu_ps(xr + j, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        float sum = hsum(ss);
        for (; j < H; j++) {
            if (delta) xr[j] += delta[i * H + j];
            sum += xr[j] * xr[j];
        }
        const float scale = 1.0f / sqrtf(sum / (float)H + eps);
        const __m256 vs = _mm256_set1_ps(scale);
        for (j = 0; j + 8 <= H; j += 8)
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + j), vs),
                                                  _mm256_loadu_ps(w + j)));
        for (; j < H; j++) o[j] = xr[j] * scale * w[j];
    }
}

/* RoPE on the q and k heads of qkv [N, (Hq + 2 * Hkv) * D] in place (rotate-half layout:
 * x * cos + roll(x, D/2) * sin_signed, cos and sin_signed [N, D]: each token's rows of the
 * tables), then k and v into one layer of
 * the cache at rows[n * Hkv + h] (rows of D floats). What a layer's attention did before its
 * matmul-free part as ~15 small ops (views, roll, mul, add, two index_copy_). */
void rope_and_store(float *qkv, int64_t N, int64_t Hq, int64_t Hkv, int64_t D,
                    const float *cos, const float *sin_signed, const int64_t *rows,
                    float *k_cache, float *v_cache) {
    const int64_t width = (Hq + 2 * Hkv) * D, half = D / 2;
    float rotated[D];
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin_signed + n * D;
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            float *x = qkv + n * width + h * D;
            for (int64_t i = 0; i < D; i++)
                rotated[i] = x[i] * c[i] + x[(i + half) % D] * s[i];
            for (int64_t i = 0; i < D; i++) x[i] = rotated[i];
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = rows[n * Hkv + h];
            const float *k = qkv + n * width + (Hq + h) * D;
            const float *v = qkv + n * width + (Hq + Hkv + h) * D;
            for (int64_t i = 0; i < D; i++) {
                k_cache[row * D + i] = k[i];
                v_cache[row * D + i] = v[i];
            }
        }
    }
}
