/* Matmuls on llama.cpp's block-quantised weights (Q4_1, Q8_0), AVX2, for the embedded engine
 * on CPUs where PyTorch has no fast low-bit kernel. Built with AVX-512 VNNI, the kernels'
 * rows and the GEMM come from block_rows_avx512.h and block_gemm_avx512.h instead.
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
 *         low nibble and weight j + 16 in its high one, as in GGUF), d, m fp16 [N, K/32].
 *   Q8_0: w = q * d, q int8; qs[N, K], d fp16 [N, K/32].
 * x is quantised on the way in, per row and block of 32, to int16 with the scale
 * max|x| / 32767 (round to nearest), and the block's exact fp32 sum is kept for Q4_1's ``m``
 * term. The products are exact integers; the error is that of x's rounding, under 2e-5 of
 * the block's largest value. (llama.cpp rounds x to int8, 256x coarser: on this 135M model
 * that moved the greedy answer to "What is the capital of France?" off Paris, and top-1
 * agreement with the fp32 reference fell to 150 of 160 steps. The AVX-512 VNNI build's GEMMs
 * take int8 x in decode steps only, where it is twice as fast: block_gemm_avx512.h.)
 *
 * Threads: OpenMP over output rows. The library is linked against the libgomp PyTorch has
 * already loaded (same soname), so it shares torch's thread pool and its thread count.
 */
#include <immintrin.h>
#include <stdint.h>

#include <math.h>
#include <omp.h>
#include <stdlib.h>

/* Built with AVX-512 VNNI (block_kernels.py picks the flags from the CPU): the kernels' rows
 * and the GEMM are block_rows_avx512.h's and block_gemm_avx512.h's instead of the AVX2 ones
 * below. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define AVX512_VNNI
#define INT8_X 1 /* decode steps' GEMMs may round x to int8 (block_gemm_avx512.h) */
#else
#define INT8_X 0
#endif

/* Rows of x processed together, so that each unpacked weight block serves several rows. */
#define ROWS 4

/* How far ahead of the weight blocks being read to prefetch, in bytes (the rows that follow
 * in the same stream): the hardware prefetcher alone left a batch-1 step 4-7 % slower
 * (benchmarks/RESULTS.md, issue 14); 1 and 2 KB measured alike. */
#define PREFETCH 2048

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

/* The KV cache is fp16 (IEEE half, as llama.cpp keeps it): half the bytes of fp32, and a
 * decode step at batch 16 reads every running sequence's keys and values from memory. */

/* 8 cache values at p as fp32. */
static inline __m256 load_half8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* One fp16 value as fp32 (a block's scale or minimum). */
static inline float half1(uint16_t h) { return _cvtsh_ss(h); }

/* x[0..n) (n a multiple of 8) rounded to fp16, to nearest even as torch's .half(), into h. */
static inline void to_half(const float *x, int64_t n, uint16_t *h) {
    for (int64_t i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

/* One block of 32 floats -> int16 q with the scale max|x| / 32767, and the block's sum. */
static inline void quantize_block(const float *xb, int16_t *q, float *scale, float *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(xb + 8 * j);
    const __m256 amax4 = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    const float amax = hmax(amax4);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    __m256i qi[4];
    for (int j = 0; j < 4; j++) qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    for (int h = 0; h < 2; h++) {
        /* packs_epi32 interleaves the 128-bit lanes of its inputs; 0xD8 restores order */
        const __m256i q16 =
            _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2 * h], qi[2 * h + 1]), 0xD8);
        _mm256_storeu_si256((__m256i *)(q + 16 * h), q16);
    }
    *scale = amax / 32767.0f;
    *sum = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
}

#ifdef AVX512_VNNI
/* A row of x's quantised blocks (nb of them) into the AVX-512 kernels' order: each whole pair
 * as [first 0-15 | second 0-15 | first 16-31 | second 16-31] (block_rows_avx512.h). */
static inline void pair_blocks(int16_t *q, int64_t nb) {
    for (int64_t b = 0; b + 2 <= nb; b += 2) {
        __m256i *v = (__m256i *)(q + b * 32);
        const __m256i first_high = _mm256_loadu_si256(v + 1);
        _mm256_storeu_si256(v + 1, _mm256_loadu_si256(v + 2));
        _mm256_storeu_si256(v + 2, first_high);
    }
}
#endif

/* M rows of x [M, K] quantised into qx, block by block, in the kernels' layout. */
static inline void quantize_rows(const float *x, int64_t M, int64_t K, const QuantizedX *qx) {
    for (int64_t i = 0; i < M * (K / 32); i++)
        quantize_block(x + i * 32, qx->q + i * 32, qx->scale + i, qx->sum + i);
#ifdef AVX512_VNNI
    for (int64_t r = 0; r < M; r++) pair_blocks(qx->q + r * K, K / 32);
#endif
}

static int quantize_x(const float *x, int64_t M, int64_t K, QuantizedX *out) {
    const int64_t nb = K / 32;
    out->q = malloc(M * K * sizeof(int16_t));
    out->scale = malloc(M * nb * sizeof(float));
    out->sum = malloc(M * nb * sizeof(float));
    if (!out->q || !out->scale || !out->sum) return -1;
#pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t r = 0; r < M; r++) {
        const QuantizedX row = {out->q + r * K, out->scale + r * nb, out->sum + r * nb};
        quantize_rows(x + r * K, 1, K, &row);
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

/* sum(a[i] * b[i]) for i < n, a fp16 */
static inline float dot_half(const uint16_t *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(load_half8(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += half1(a[i]) * b[i];
    return s;
}

/* Q4_1 block b's 32 weights q as int16: weights 0-15 (low nibbles), then 16-31. Each byte
 * zero-extended to 16 bits first, so one load-and-extend serves both halves (a byte's high
 * nibble is then just its value >> 4): 3 instructions where unpacking the nibbles in 8 bits
 * took 6. */
static inline void q4_1_block(const uint8_t *qn, int64_t b, __m256i w[2]) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qn + b * 16)));
    w[0] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    w[1] = _mm256_srli_epi16(bytes, 4);
}

/* Q8_0 block b's 32 weights as int16. */
static inline void q8_0_block(const int8_t *qn, int64_t b, __m256i w[2]) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qn + b * 32)));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qn + b * 32 + 16)));
}

#ifdef AVX512_VNNI
#include "block_rows_avx512.h"
#else

/* One output row of W against ``rows`` rows of quantised x (a literal at each call site, so
 * the accumulators stay in registers). Blocks go in pairs with one accumulator each, so
 * that consecutive blocks' FMAs do not wait on each other's latency. */
#define ROW_BODY(BLOCK_FN, BLOCK_BYTES)                                                    \
    __m256 acc0[ROWS], acc1[ROWS];                                                         \
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();               \
    int64_t b = 0;                                                                         \
    for (; b + 2 <= nb; b += 2) {                                                          \
        _mm_prefetch((const char *)(qn + b * BLOCK_BYTES) + PREFETCH, _MM_HINT_T0);        \
        __m256i w0[2], w1[2];                                                              \
        BLOCK_FN(qn, b, w0);                                                               \
        BLOCK_FN(qn, b + 1, w1);                                                           \
        for (int r = 0; r < rows; r++) {                                                   \
            const int64_t xb = r * nb + b;                                                 \
            acc0[r] = _mm256_fmadd_ps(dot_block(w0, xq + xb * 32),                         \
                                      _mm256_set1_ps(half1(dn[b]) * xs[xb]), acc0[r]);     \
            acc1[r] = _mm256_fmadd_ps(dot_block(w1, xq + (xb + 1) * 32),                   \
                                      _mm256_set1_ps(half1(dn[b + 1]) * xs[xb + 1]),       \
                                      acc1[r]);                                            \
        }                                                                                  \
    }                                                                                      \
    if (b < nb) {                                                                          \
        __m256i w0[2];                                                                     \
        BLOCK_FN(qn, b, w0);                                                               \
        for (int r = 0; r < rows; r++) {                                                   \
            const int64_t xb = r * nb + b;                                                 \
            acc0[r] = _mm256_fmadd_ps(dot_block(w0, xq + xb * 32),                         \
                                      _mm256_set1_ps(half1(dn[b]) * xs[xb]), acc0[r]);     \
        }                                                                                  \
    }

/* ROW_BODY for Q4_1, plus the m term of each block: m * (the x block's exact sum). */
static inline __attribute__((always_inline)) void q4_1_row(
    const uint8_t *qn, const uint16_t *dn, const uint16_t *mn, int64_t nb, const int16_t *xq,
    const float *xs, const float *xsum, const int rows, float out[ROWS]) {
    ROW_BODY(q4_1_block, 16)
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + dot_half(mn, xsum + r * nb, nb);
}

static inline __attribute__((always_inline)) void q8_0_row(
    const int8_t *qn, const uint16_t *dn, int64_t nb, const int16_t *xq, const float *xs,
    const int rows, float out[ROWS]) {
    ROW_BODY(q8_0_block, 32)
    for (int r = 0; r < rows; r++) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

#endif

/* Q4_1 (m set) or Q8_0 (m NULL) blocks of a weight [N, K], as q4_1_linear / q8_0_linear take
 * them. */
typedef struct {
    const void *qs;
    const uint16_t *d, *m; /* fp16, as GGUF keeps them: 4 of a Q4_1 block's 20 bytes, where
                            * fp32 made it 24 (a batch-1 step, which reads them all, took
                            * 0.93-0.95x the time with 20; benchmarks/step_ab.py) */
} BlockWeights;

/* Rows of x that block_rows takes at once (its callers' stack buffers). */
#define MAX_M_KERNEL 16

/* Output row n of W (Q4_1 or Q8_0) against the M (1..MAX_M_KERNEL) rows of quantised x,
 * ROWS rows at a time. */
static inline void block_rows(const BlockWeights *w, int64_t n, int64_t nb,
                              const QuantizedX *qx, int64_t M, float out[MAX_M_KERNEL]) {
    const uint16_t *dn = w->d + n * nb;
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int16_t *q = qx->q + r0 * nb * 32;
        const float *scale = qx->scale + r0 * nb, *sum = qx->sum + r0 * nb;
        float *o = out + r0;
        if (w->m) {
            const uint8_t *qn = (const uint8_t *)w->qs + n * nb * 16;
            const uint16_t *mn = w->m + n * nb;
            switch (M - r0) {
            case 1: q4_1_row(qn, dn, mn, nb, q, scale, sum, 1, o); break;
            case 2: q4_1_row(qn, dn, mn, nb, q, scale, sum, 2, o); break;
            case 3: q4_1_row(qn, dn, mn, nb, q, scale, sum, 3, o); break;
            default: q4_1_row(qn, dn, mn, nb, q, scale, sum, 4, o); break;
            }
        } else {
            const int8_t *qn = (const int8_t *)w->qs + n * nb * 32;
            switch (M - r0) {
            case 1: q8_0_row(qn, dn, nb, q, scale, 1, o); break;
            case 2: q8_0_row(qn, dn, nb, q, scale, 2, o); break;
            case 3: q8_0_row(qn, dn, nb, q, scale, 3, o); break;
            default: q8_0_row(qn, dn, nb, q, scale, 4, o); break;
            }
        }
    }
}

/* y[M, N] = x @ W^T by the kernels: x quantised once, then in parallel over output rows n,
 * block_rows for each MAX_M_KERNEL rows of x. Returns 0, or -1 when memory for the quantised
 * x could not be allocated. */
static int block_linear(const float *x, int64_t M, int64_t K, const BlockWeights *w, int64_t N,
                        float *y) {
    const int64_t nb = K / 32;
    QuantizedX qx;
    if (quantize_x(x, M, K, &qx) != 0) {
        free_x(&qx);
        return -1;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t r0 = 0; r0 < M; r0 += MAX_M_KERNEL) {
            const int64_t rows = M - r0 < MAX_M_KERNEL ? M - r0 : MAX_M_KERNEL;
            const QuantizedX part = {qx.q + r0 * K, qx.scale + r0 * nb, qx.sum + r0 * nb};
            float out[MAX_M_KERNEL];
            block_rows(w, n, nb, &part, rows, out);
            for (int64_t r = 0; r < rows; r++) y[(r0 + r) * N + n] = out[r];
        }
    }
    free_x(&qx);
    return 0;
}

int q4_1_linear(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d,
                const uint16_t *m, int64_t N, float *y) {
    const BlockWeights w = {qs, d, m};
    return block_linear(x, M, K, &w, N, y);
}

int q8_0_linear(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d,
                int64_t N, float *y) {
    const BlockWeights w = {qs, d, NULL};
    return block_linear(x, M, K, &w, N, y);
}

/* One row of H: x += delta (when delta is not NULL), then out = x / rms(x) * w. */
static inline void add_rms_norm_row(float *xr, const float *delta, int64_t H, const float *w,
                                    float eps, float *o) {
    __m256 ss = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= H; j += 8) {
        __m256 v = _mm256_loadu_ps(xr + j);
        if (delta) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(delta + j));
            _mm256_storeu_ps(xr + j, v);
        }
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float sum = hsum(ss);
    for (; j < H; j++) {
        if (delta) xr[j] += delta[j];
        sum += xr[j] * xr[j];
    }
    const float scale = 1.0f / sqrtf(sum / (float)H + eps);
    const __m256 vs = _mm256_set1_ps(scale);
    for (j = 0; j + 8 <= H; j += 8)
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + j), vs),
                                              _mm256_loadu_ps(w + j)));
    for (; j < H; j++) o[j] = xr[j] * scale * w[j];
}

/* x += delta (when delta is not NULL), then out = x / rms(x) * w, per row of H; fp32. The
 * residual add and RMSNorm of every layer in one call: F.rms_norm on CPU is six ops of a few
 * microseconds each at batch 1, and a decode step has 61 of them. */
void add_rms_norm(float *x, const float *delta, int64_t M, int64_t H, const float *w,
                  float eps, float *out) {
    for (int64_t i = 0; i < M; i++)
        add_rms_norm_row(x + i * H, delta ? delta + i * H : NULL, H, w, eps, out + i * H);
}

/* RoPE on the q and k heads of qkv [N, (Hq + 2 * Hkv) * D] in place (rotate-half layout:
 * x * cos + roll(x, D/2) * sin_signed, cos and sin_signed [N, D]: each token's rows of the
 * tables), then k and v into one layer of the fp16 cache at rows[n * Hkv + h] (rows of D
 * values; D a multiple of 8). What a layer's attention did before its matmul-free part as
 * ~15 small ops (views, roll, mul, add, two index_copy_). */
void rope_and_store(float *qkv, int64_t N, int64_t Hq, int64_t Hkv, int64_t D,
                    const float *cos, const float *sin_signed, const int64_t *rows,
                    uint16_t *k_cache, uint16_t *v_cache) {
    const int64_t width = (Hq + 2 * Hkv) * D, half = D / 2;
    /* Tokens are independent: a prompt chunk's split over the threads (a 1,000-token prompt
     * spent ~4 % of its prefill here on one thread). */
#pragma omp parallel for schedule(static) if (N >= 64)
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin_signed + n * D;
        float rotated[D];
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            float *x = qkv + n * width + h * D;
            /* roll(x, D/2) in two halves: no index arithmetic in the loops, which vectorise */
            for (int64_t i = 0; i < half; i++) rotated[i] = x[i] * c[i] + x[i + half] * s[i];
            for (int64_t i = half; i < D; i++) rotated[i] = x[i] * c[i] + x[i - half] * s[i];
            for (int64_t i = 0; i < D; i++) x[i] = rotated[i];
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = rows[n * Hkv + h];
            to_half(qkv + n * width + (Hq + h) * D, D, k_cache + row * D);
            to_half(qkv + n * width + (Hq + Hkv + h) * D, D, v_cache + row * D);
        }
    }
}

/* e^x for x <= 0 (softmax scores less their max), 8 at a time: Cephes' expf (range reduction
 * by ln 2, degree-6 polynomial), within 2 ulp; below -87 it gives e^-87, not 0. */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f)); /* keeps 2^n a normal float */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* silu(g) * u = g * sigmoid(g) * u, with sigmoid from e^-|g| so that exp_neg serves both
 * signs: 1 / (1 + t) for g >= 0, t / (1 + t) below. */
static inline __m256 silu_times(__m256 g, __m256 u) {
    const __m256 t = exp_neg(_mm256_or_ps(g, _mm256_set1_ps(-0.0f))); /* e^-|g| */
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(t, _mm256_set1_ps(1.0f)));
    const __m256 sig = _mm256_blendv_ps(_mm256_mul_ps(t, inv), inv,
                                        _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}

/* ---- fp32 GEMM on weights dequantised a panel at a time (prefill, larger batches) ---------
 *
 * Above a few rows of x the kernels above lose to a GEMM (benchmarks/block_kernels.py): they
 * spend ~8 instructions per block of 32 products and row, where a register-tiled fp32 GEMM
 * spends 4 FMAs. fbgemm's fp16 GEMM did that before, at the price of a second, fp16 copy of
 * every weight (2 bytes each beside Q4_1's 0.6) and seconds of packing at start. Here each
 * thread dequantises NR output rows of W at a time into fp32 (a panel, in L1/L2) and
 * multiplies it by x, packed once per call as x^T in chunks of 16 rows ([K][16] each, the
 * last maybe [K][8]): per k, 2 loads of x^T, 6 broadcasts of the panel, 12 FMAs into 12
 * accumulators. The weights' fp32 values are exact (q * d + m), the products fp32 as in any
 * sgemm; a row of x gets the same arithmetic whichever rows are beside it. */

#define NR 12 /* output rows of W per panel */

/* n fp16 values (n <= 64) into fp32 out, 8 at a time. */
static inline void halves(const uint16_t *h, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load_half8(h + i));
    for (; i < n; i++) out[i] = half1(h[i]);
}

/* What the next panel's fill will read (its rows' q, d and m: up to two runs of rows), to be
 * fetched into the cache while this panel computes. The weights stream from memory, 94 MB a
 * step; read in a burst between two tiles, the hardware prefetcher could not keep ahead and
 * fill_panel waited on those loads: ~17 % of a batch-16 step with AVX-512 (perf). */
typedef struct {
    const char *start[6];
    /* Per range, its cache lines and the lines per block of K in 32.32 fixed point: a
     * block's share is found without dividing, where two integer divisions per range and
     * block had been ~1/3 of the AMX build's tiles (perf). */
    int64_t lines[6], per_block[6];
    int ranges;
} Ahead;

/* Rows [first, first + count) of W into ahead (nothing when count <= 0). */
static inline void ahead_rows(Ahead *ahead, const BlockWeights *w, int64_t first, int64_t count,
                              int64_t K) {
    if (count <= 0) return;
    const int64_t nb = K / 32, row = w->m ? K / 2 : K;
    const char *parts[3] = {(const char *)w->qs + first * row, (const char *)(w->d + first * nb),
                            w->m ? (const char *)(w->m + first * nb) : NULL};
    const int64_t sizes[3] = {count * row, count * nb * 2, count * nb * 2};
    for (int i = 0; i < 3; i++) {
        if (!parts[i]) continue;
        const int64_t lines = (sizes[i] + 63) / 64;
        ahead->start[ahead->ranges] = parts[i];
        ahead->lines[ahead->ranges] = lines;
        ahead->per_block[ahead->ranges++] = (lines << 32) / nb;
    }
}

/* One cache line into L2 (the tile's x and panel fill L1). In assembly: GCC's
 * inter-procedural passes took _mm_prefetch here for a call without effect and removed the
 * whole fetch, arguments and all (seen in objdump). */
static inline void fetch_line(const char *p) { __asm__ volatile("prefetcht1 %0" : : "m"(*p)); }

/* Block ``b`` of K's ``nb`` blocks: its share of every range's lines, the last block up to
 * the range's end. */
static inline void fetch_part(const Ahead *ahead, int64_t b, int64_t nb) {
    for (int r = 0; r < ahead->ranges; r++) {
        const int64_t end = b + 1 == nb ? ahead->lines[r] : ((b + 1) * ahead->per_block[r]) >> 32;
        for (int64_t l = (b * ahead->per_block[r]) >> 32; l < end; l++)
            fetch_line(ahead->start[r] + l * 64);
    }
}

/* The panel after the one of rows n0.. (plain: NR rows of W [N, K]). */
static inline Ahead after_panel(const BlockWeights *w, int64_t n0, int64_t N, int64_t K) {
    Ahead ahead = {{NULL}, {0}, {0}, 0};
    const int64_t next = n0 + NR;
    ahead_rows(&ahead, w, next, N - next < NR ? N - next : NR, K);
    return ahead;
}

/* The panel after the one of gate rows i0.. (swiglu: NR / 2 gate rows and their up rows). */
static inline Ahead after_swiglu_panel(const BlockWeights *w13, int64_t i0, int64_t I,
                                       int64_t K) {
    Ahead ahead = {{NULL}, {0}, {0}, 0};
    const int64_t next = i0 + NR / 2, count = I - next < NR / 2 ? I - next : NR / 2;
    ahead_rows(&ahead, w13, next, count, K);
    ahead_rows(&ahead, w13, I + next, count, K);
    return ahead;
}

#ifndef AVX512_VNNI

/* r[i][j] -> r[j][i] for an 8x8 block of floats in 8 registers. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]); /* r_i0 r_(i+1)0 r_i1 r_(i+1)1 | 4..5 */
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        for (int h = 0; h < 2; h++) {
            u[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], 0x44);
            u[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], 0xEE);
        }
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* x [M, K] -> chunks of 16 rows (the last 8 when M's rest is 8 or fewer), each [K][width],
 * zero-padded to M rounded up to 8: rows [m0, m0 + 8) of it, 8x8 blocks transposed in
 * registers (K is a multiple of 32: one float at a time, the stores to the chunk's strided
 * columns took ~3 % of a batch-16 decode step). */
static inline void pack_rows8(const float *x, int64_t M, int64_t K, int64_t m0, float *xt) {
    const int64_t Mp = (M + 7) / 8 * 8, c0 = m0 / 16 * 16, width = Mp - c0 >= 16 ? 16 : 8;
    float *chunk = xt + c0 * K + (m0 - c0);
    for (int64_t k = 0; k < K; k += 8) {
        __m256 r[8];
        for (int64_t j = 0; j < 8; j++)
            r[j] = m0 + j < M ? _mm256_loadu_ps(x + (m0 + j) * K + k) : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t i = 0; i < 8; i++) _mm256_storeu_ps(chunk + (k + i) * width, r[i]);
    }
}

/* The packed x's rows per pack_rows call, and the scratch floats of packed x and a panel. */
#define PACK_ROWS 8
static inline int64_t packed_floats(int64_t M, int64_t K) { return (M + 7) / 8 * 8 * K; }
static inline int64_t panel_floats(int64_t K) { return NR * K; }
/* int8: the AVX-512 build's int8 x for decode steps; this build has no VPDPBUSD, and
 * decode_layers never asks it for int8. */
static inline void pack_rows(const float *x, int64_t M, int64_t K, int64_t m0, float *xt,
                             const int int8) {
    (void)int8;
    pack_rows8(x, M, K, m0, xt);
}

/* W's row n into K fp32 weights, as dequantize_q4_1 / dequantize_q8_0. The blocks' scales
 * and minimums are converted 64 blocks at a time, so that each block's then costs a
 * broadcast from memory, as when they were stored as fp32 (converting each block's on its
 * own made a batch-16 step ~4 % slower). */
static inline void dequant_row(const BlockWeights *w, int64_t n, int64_t K, float *out) {
    const int64_t nb = K / 32;
    const __m256i low = _mm256_set1_epi32(0x0F);
    for (int64_t b0 = 0; b0 < nb; b0 += 64) {
        const int64_t bn = nb - b0 < 64 ? nb - b0 : 64;
        float dn[64], mn[64];
        halves(w->d + n * nb + b0, bn, dn);
        if (w->m) {
            const uint8_t *qn = (const uint8_t *)w->qs + (n * nb + b0) * 16;
            float *o = out + b0 * 32;
            halves(w->m + n * nb + b0, bn, mn);
            for (int64_t b = 0; b < bn; b++) {
                const __m256 d = _mm256_set1_ps(dn[b]), m = _mm256_set1_ps(mn[b]);
                /* bytes 8h..8h+7, each zero-extended to 32 bits: their low nibbles are
                 * weights 8h.., their high ones weights 16 + 8h.. (as in q4_1_block) */
                for (int h = 0; h < 2; h++) {
                    const __m256i bytes = _mm256_cvtepu8_epi32(
                        _mm_loadl_epi64((const __m128i *)(qn + b * 16 + 8 * h)));
                    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low));
                    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
                    _mm256_storeu_ps(o + b * 32 + 8 * h, _mm256_fmadd_ps(lo, d, m));
                    _mm256_storeu_ps(o + b * 32 + 16 + 8 * h, _mm256_fmadd_ps(hi, d, m));
                }
            }
        } else {
            const int8_t *qn = (const int8_t *)w->qs + n * K + b0 * 32;
            float *o = out + b0 * 32;
            for (int64_t b = 0; b < bn; b++) {
                const __m256 d = _mm256_set1_ps(dn[b]);
                for (int j = 0; j < 4; j++) {
                    const __m128i raw = _mm_loadl_epi64((const __m128i *)(qn + b * 32 + 8 * j));
                    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                    _mm256_storeu_ps(o + b * 32 + 8 * j, _mm256_mul_ps(q, d));
                }
            }
        }
    }
}

/* The panel [NR][K]: row i is W's row rows[i], or zeros where rows[i] < 0. */
static inline void fill_panel(const BlockWeights *w, const int64_t rows[NR], int64_t K,
                              float *panel, const int int8) {
    (void)int8; /* as in pack_rows */
    for (int i = 0; i < NR; i++) {
        if (rows[i] >= 0)
            dequant_row(w, rows[i], K, panel + i * K);
        else
            for (int64_t k = 0; k < K; k++) panel[i * K + k] = 0.0f;
    }
}

/* R rows of a panel ([R][K], R * V <= 12) against one chunk of x^T ([K][8 * V]) -> out[R][16],
 * columns 8 * V used: R * V accumulators, enough to hide the FMAs' latency at 12. (Blocking
 * over K, to keep the panel's and x's slices in L1, measured alike.) Fetches ``ahead`` (when
 * not NULL) a part per block of 32 k. */
static inline __attribute__((always_inline)) void gemm_tile(const float *panel, int64_t K,
                                                            const float *xt, const int R,
                                                            const int V, const Ahead *ahead,
                                                            float out[][16]) {
    __m256 c[12][2];
    for (int i = 0; i < R; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        if (ahead) fetch_part(ahead, k0 / 32, K / 32);
        for (int64_t k = k0; k < k0 + 32; k++) {
            const __m256 x0 = _mm256_loadu_ps(xt + k * 8 * V);
            const __m256 x1 = V == 2 ? _mm256_loadu_ps(xt + k * 16 + 8) : x0;
            for (int i = 0; i < R; i++) {
                const __m256 w = _mm256_broadcast_ss(panel + i * K + k);
                c[i][0] = _mm256_fmadd_ps(w, x0, c[i][0]);
                if (V == 2) c[i][1] = _mm256_fmadd_ps(w, x1, c[i][1]);
            }
        }
    }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(out[i], c[i][0]);
        if (V == 2) _mm256_storeu_ps(out[i] + 8, c[i][1]);
    }
}

/* The panel against every chunk of the packed x. Plain: y[m, n0 + i] = panel row i . x[m] for
 * i < rows (y [M, N]). swiglu: rows 0..NR/2 of the panel are gate rows n0 + i, the rest the
 * matching up rows, and y[m, n0 + i] = silu(gate) * up for i < rows (y [M, N], N = I). */
static inline void multiply_panel(const float *panel, const float *xt, int64_t M, int64_t K,
                                  int64_t n0, int64_t rows, int64_t N, float *y,
                                  const BlockWeights *w, const int swiglu, const Ahead *ahead,
                                  const int int8) {
    (void)w; /* the panel holds fp32 weights, whichever the format */
    (void)int8; /* as in pack_rows */
    const int64_t Mp = (M + 7) / 8 * 8;
    for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
        float out[NR][16];
        const int V = Mp - m0 >= 16 ? 2 : 1;
        const Ahead *fetch = m0 == 0 ? ahead : NULL; /* the first chunk fetches */
        if (V == 2) { /* two halves: 12 accumulators each */
            gemm_tile(panel, K, xt + m0 * K, NR / 2, 2, fetch, out);
            gemm_tile(panel + NR / 2 * K, K, xt + m0 * K, NR / 2, 2, NULL, out + NR / 2);
        } else {
            gemm_tile(panel, K, xt + m0 * K, NR, 1, fetch, out);
        }
        const int64_t width = M - m0 < 8 * V ? M - m0 : 8 * V;
        if (swiglu) {
            for (int64_t i = 0; i < rows; i++)
                for (int v = 0; v < V; v++)
                    _mm256_storeu_ps(out[i] + 8 * v,
                                     silu_times(_mm256_loadu_ps(out[i] + 8 * v),
                                                _mm256_loadu_ps(out[NR / 2 + i] + 8 * v)));
        }
        for (int64_t j = 0; j < width; j++)
            for (int64_t i = 0; i < rows; i++) y[(m0 + j) * N + n0 + i] = out[i][j];
    }
}

#else
#include "block_gemm_avx512.h"
#endif

#ifndef AMX_INT8 /* the builds without AMX tiles: no tile shapes to load */
static inline void amx_begin(void) {}
static inline void amx_end(void) {}
#endif

/* y[M, N] = x @ W^T from x packed (xt, int8 or not as int8 says), this thread's share of W's
 * rows, one panel (scratch of panel_floats(K)) at a time, either build's fill_panel and
 * multiply_panel; ends with the team's barrier (an orphaned omp for). */
static void team_gemm(const BlockWeights *w, const float *xt, int64_t M, int64_t K, int64_t N,
                      float *panel, float *y, const int int8) {
    if (int8) amx_begin();
#pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += NR) {
        int64_t rows[NR];
        for (int64_t i = 0; i < NR; i++) rows[i] = n0 + i < N ? n0 + i : -1;
        fill_panel(w, rows, K, panel, int8);
        const Ahead ahead = after_panel(w, n0, N, K);
        multiply_panel(panel, xt, M, K, n0, N - n0 < NR ? N - n0 : NR, N, y, w, 0, &ahead,
                       int8);
    }
    if (int8) amx_end();
}

/* act[M, I] = silu(gate) * up with [gate | up] = x @ W13^T (W13: I gate rows, then I up
 * rows), as team_gemm. */
static void team_gemm_swiglu(const BlockWeights *w13, const float *xt, int64_t M, int64_t K,
                             int64_t I, float *panel, float *act, const int int8) {
    if (int8) amx_begin();
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < I; i0 += NR / 2) {
        int64_t rows[NR];
        for (int64_t i = 0; i < NR / 2; i++) {
            rows[i] = i0 + i < I ? i0 + i : -1;
            rows[NR / 2 + i] = i0 + i < I ? I + i0 + i : -1;
        }
        fill_panel(w13, rows, K, panel, int8);
        const Ahead ahead = after_swiglu_panel(w13, i0, I, K);
        multiply_panel(panel, xt, M, K, i0, I - i0 < NR / 2 ? I - i0 : NR / 2, I, act, w13,
                       1, &ahead, int8);
    }
    if (int8) amx_end();
}

/* y[M, N] = x[M, K] @ W^T (team_gemm in a parallel region of its own); with swiglu, y[M, N]
 * = silu(gate) * up of W's N gate rows, then N up rows (team_gemm_swiglu); x rounded to int8
 * where int8 is set (and the build has INT8_X). Returns 0, or -1 without memory for the
 * packed x and the panels. */
static int block_gemm(const float *x, int64_t M, int64_t K, const BlockWeights *w, int64_t N,
                      float *y, const int swiglu, int int8) {
    int8 = int8 && INT8_X;
    const int threads = omp_get_max_threads();
    float *xt = malloc(packed_floats(M, K) * sizeof(float));
    float *panels = malloc(threads * panel_floats(K) * sizeof(float));
    if (xt && panels) {
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (int64_t m0 = 0; m0 < M; m0 += PACK_ROWS) pack_rows(x, M, K, m0, xt, int8);
            float *panel = panels + omp_get_thread_num() * panel_floats(K);
            if (swiglu)
                team_gemm_swiglu(w, xt, M, K, N, panel, y, int8);
            else
                team_gemm(w, xt, M, K, N, panel, y, int8);
        }
    }
    const int failed = !xt || !panels;
    free(xt);
    free(panels);
    return failed ? -1 : 0;
}

int q4_1_gemm(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d,
              const uint16_t *m, int64_t N, float *y) {
    const BlockWeights w = {qs, d, m};
    return block_gemm(x, M, K, &w, N, y, 0, 0);
}

/* act[M, I] = silu(gate) * up, [gate | up] = x @ W^T for Q4_1 W [2 * I, K] (I gate rows,
 * then I up rows): a prompt's MLP without the [M, 2 * I] product and the torch ops after it
 * (chunk, silu, mul). */
int q4_1_gemm_swiglu(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d,
                     const uint16_t *m, int64_t I, float *act) {
    const BlockWeights w = {qs, d, m};
    return block_gemm(x, M, K, &w, I, act, 1, 0);
}

int q8_0_gemm(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d,
              int64_t N, float *y) {
    const BlockWeights w = {qs, d, NULL};
    return block_gemm(x, M, K, &w, N, y, 0, 0);
}

/* The three GEMMs above with x rounded to int8, the arithmetic of decode steps' GEMMs in
 * decode_layers (the builds with INT8_X only): for their tests and benchmarks. */
int q4_1_gemm_int8(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d,
                   const uint16_t *m, int64_t N, float *y) {
    const BlockWeights w = {qs, d, m};
    return block_gemm(x, M, K, &w, N, y, 0, 1);
}

int q4_1_gemm_swiglu_int8(const float *x, int64_t M, int64_t K, const uint8_t *qs,
                          const uint16_t *d, const uint16_t *m, int64_t I, float *act) {
    const BlockWeights w = {qs, d, m};
    return block_gemm(x, M, K, &w, I, act, 1, 1);
}

int q8_0_gemm_int8(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d,
                   int64_t N, float *y) {
    const BlockWeights w = {qs, d, NULL};
    return block_gemm(x, M, K, &w, N, y, 0, 1);
}

/* ---- A decode step's decoder layers in one call (1..MAX_M tokens, Q4_1 weights) ---------
 *
 * At batch 1 the layers' matmuls take ~7 ms of a step, and the ~20 small torch ops and
 * ctypes calls around them per layer took ~5 ms more (dispatch, argument conversion, one
 * OpenMP fork/join per parallel op). Here the whole stack of layers runs inside one
 * parallel region: the matmuls are shared out by rows between the threads with a barrier
 * after each, and what is cheap (RMSNorm, quantising or packing a matmul's input, the
 * residual) each thread does for itself on its own copy, so it needs no barrier. Same
 * arithmetic as the per-op path (add_rms_norm, q4_1_linear or the GEMMs, rope_and_store);
 * attention and SiLU are plain C. */

/* One decoder layer's weights: the caller passes 14 pointers per layer in this order. */
typedef struct {
    const float *attn_norm;
    BlockWeights wqkv, wo; /* Q4_1; wqkv: rows q (Hq * D), k, v (Hkv * D each) */
    const float *ffn_norm;
    BlockWeights w13, w2; /* Q4_1; w13: rows gate (I), then up (I) */
} LayerWeights;

/* The most tokens of one decode_layers call (beyond MAX_M_KERNEL, by the GEMMs only):
 * groups of ROWS rows of x each read the weights once more, so from some batch size on the
 * GEMMs win (the caller's gemm_from, measured: RESULTS.md). */
#define MAX_M 64

/* y[M, N] = x @ W^T by the kernels, this thread's share of the rows; ends with the team's
 * barrier (an orphaned omp for: called inside the parallel region). */
static void team_linear(const BlockWeights *w, const QuantizedX *qx, int64_t M, int64_t K,
                        int64_t N, float *y) {
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float out[MAX_M_KERNEL];
        block_rows(w, n, K / 32, qx, M, out);
        for (int64_t r = 0; r < M; r++) y[r * N + n] = out[r];
    }
}

/* act[M, I] = silu(gate) * up with [gate | up] = x @ W13^T by the kernels, this thread's
 * share of i, 8 at a time for a vector SiLU. */
static void team_swiglu(const BlockWeights *w, const QuantizedX *qx, int64_t M, int64_t K,
                        int64_t I, float *act) {
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < I; i0 += 8) {
        float gate[MAX_M_KERNEL][8], up[MAX_M_KERNEL][8];
        for (int64_t i = 0; i < 8; i++) {
            float g[MAX_M_KERNEL], u[MAX_M_KERNEL];
            block_rows(w, i0 + i, K / 32, qx, M, g);
            block_rows(w, I + i0 + i, K / 32, qx, M, u);
            for (int64_t r = 0; r < M; r++) gate[r][i] = g[r], up[r][i] = u[r];
        }
        for (int64_t r = 0; r < M; r++)
            _mm256_storeu_ps(act + r * I + i0,
                             silu_times(_mm256_loadu_ps(gate[r]), _mm256_loadu_ps(up[r])));
    }
}

/* A matmul's input as each thread holds its own copy: quantised rows for the kernels, or x
 * packed for the GEMMs (with the thread's panel), as int8 where int8 is set. */
typedef struct {
    int gemm, int8;
    QuantizedX qx;
    float *xt, *panel;
} Operand;

static inline void prepare(const float *x, int64_t M, int64_t K, Operand *op) {
    if (op->gemm) {
        for (int64_t m0 = 0; m0 < M; m0 += PACK_ROWS) pack_rows(x, M, K, m0, op->xt, op->int8);
    } else {
        quantize_rows(x, M, K, &op->qx);
    }
}

static inline void team_matmul(const BlockWeights *w, const Operand *op, int64_t M, int64_t K,
                               int64_t N, float *y) {
    if (op->gemm)
        team_gemm(w, op->xt, M, K, N, op->panel, y, op->int8);
    else
        team_linear(w, &op->qx, M, K, N, y);
}

static inline void team_matmul_swiglu(const BlockWeights *w13, const Operand *op, int64_t M,
                                      int64_t K, int64_t I, float *act) {
    if (op->gemm)
        team_gemm_swiglu(w13, op->xt, M, K, I, op->panel, act, op->int8);
    else
        team_swiglu(w13, &op->qx, M, K, I, act);
}

/* The lane sums of a[0..7], in order, in one vector. */
static inline __m256 hsum8(const __m256 a[8]) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    /* h0: sums of a0..a3 over the low lane, then over the high lane; h1 likewise a4..a7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                         _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* x * cos + roll(x, D/2) * sin_signed (rope_and_store's arithmetic) into out, in two halves:
 * an index modulo a run-time D is an integer division per element. */
static inline void rope_head(const float *x, const float *c, const float *s, int64_t D,
                             float *out) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int64_t i = half; i < D; i++) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

/* Query heads attended together: they share their KV head's keys and values, and each key
 * and value is converted from fp16 once for all of them. As many as the registers hold: 3
 * with AVX-512 (8 keys x 3 heads of accumulators), 1 with AVX2's 16 registers. */
#ifdef AVX512_VNNI
#define HEADS_AT_ONCE 3
#else
#define HEADS_AT_ONCE 1
#endif

/* scores[h][j..j + 8) = scale * (q[h] . the cache's next 8 rows of D keys, fp16 [8][D]), for
 * heads h < G (a literal at each call site). */
static inline __attribute__((always_inline)) void score8(const float *const *q, const int G,
                                                         const uint16_t *kc, int64_t D,
                                                         float scale, float *const *scores,
                                                         int64_t j) {
#ifdef AVX512_VNNI
    __m512 acc[HEADS_AT_ONCE][8];
    for (int h = 0; h < G; h++)
        for (int t = 0; t < 8; t++) acc[h][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
        __m512 qi[HEADS_AT_ONCE];
        for (int h = 0; h < G; h++) qi[h] = _mm512_loadu_ps(q[h] + i);
        for (int t = 0; t < 8; t++) {
            const __m512 key =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + t * D + i)));
            for (int h = 0; h < G; h++) acc[h][t] = _mm512_fmadd_ps(qi[h], key, acc[h][t]);
        }
    }
    for (int h = 0; h < G; h++) {
        __m256 half[8];
        for (int t = 0; t < 8; t++) { /* the two halves' sum: the 8 lanes that hsum8 takes */
            const __m512d pair = _mm512_castps_pd(acc[h][t]);
            half[t] = _mm256_add_ps(_mm512_castps512_ps256(acc[h][t]),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(pair, 1)));
        }
        _mm256_storeu_ps(scores[h] + j, _mm256_mul_ps(hsum8(half), _mm256_set1_ps(scale)));
    }
#else
    (void)G; /* HEADS_AT_ONCE is 1 */
    __m256 acc[8];
    for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
        const __m256 qi = _mm256_loadu_ps(q[0] + i);
        for (int t = 0; t < 8; t++)
            acc[t] = _mm256_fmadd_ps(qi, load_half8(kc + t * D + i), acc[t]);
    }
    _mm256_storeu_ps(scores[0] + j, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
#endif
}

/* out[h][0..64) = inv[h] * (the weights w[h][0..pos) times the cache's rows of values (fp16,
 * D apart; 64 of each row from vc), plus w[h][pos] times the token's own v[0..64)), for heads
 * h < G (a literal at each call site). */
static inline __attribute__((always_inline)) void values64(const float *const *w, const int G,
                                                           const uint16_t *vc, const float *v,
                                                           int64_t pos, int64_t D,
                                                           const float *inv, float *const *out) {
#ifdef AVX512_VNNI
    __m512 a[HEADS_AT_ONCE][4];
    for (int h = 0; h < G; h++)
        for (int t = 0; t < 4; t++) a[h][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pos; j++) {
        __m512 row[4];
        for (int t = 0; t < 4; t++)
            row[t] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vc + j * D + 16 * t)));
        for (int h = 0; h < G; h++) {
            const __m512 wj = _mm512_set1_ps(w[h][j]);
            for (int t = 0; t < 4; t++) a[h][t] = _mm512_fmadd_ps(wj, row[t], a[h][t]);
        }
    }
    for (int h = 0; h < G; h++) {
        const __m512 own = _mm512_set1_ps(w[h][pos]); /* the token's own value */
        for (int t = 0; t < 4; t++) {
            a[h][t] = _mm512_fmadd_ps(own, _mm512_loadu_ps(v + 16 * t), a[h][t]);
            _mm512_storeu_ps(out[h] + 16 * t, _mm512_mul_ps(a[h][t], _mm512_set1_ps(inv[h])));
        }
    }
#else
    (void)G; /* HEADS_AT_ONCE is 1 */
    __m256 acc[8];
    for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < pos; j++) {
        const __m256 wj = _mm256_broadcast_ss(w[0] + j);
        for (int t = 0; t < 8; t++)
            acc[t] = _mm256_fmadd_ps(wj, load_half8(vc + j * D + 8 * t), acc[t]);
    }
    const __m256 own = _mm256_broadcast_ss(w[0] + pos); /* the token's own value */
    for (int t = 0; t < 8; t++) {
        acc[t] = _mm256_fmadd_ps(own, _mm256_loadu_ps(v + 8 * t), acc[t]);
        _mm256_storeu_ps(out[0] + 8 * t, _mm256_mul_ps(acc[t], _mm256_set1_ps(inv[0])));
    }
#endif
}

/* G (1..HEADS_AT_ONCE, a literal at each call site) query heads q[h] of one token attending
 * to their sequence's keys [0, pos] of their KV head: the cache holds [0, pos) ([max_len, D]
 * rows, fp16); the token's own key and value are k (roped) and v, as fp32 values that fp16
 * holds exactly (what the cache gets). D a multiple of 64. scores[h]: pos + 8 floats of
 * scratch each; out[h]: D floats. Scores 8 keys at a time (8 independent dot products, one
 * reduction), softmax with a vector exp, and the weighted sum of values 64 dimensions at a
 * time in registers: the scalar version of this took ~40 µs of each layer at 128 keys. */
static inline __attribute__((always_inline)) void attend_heads(
    const float *const *q, const int G, const float *k, const float *v, const uint16_t *k_cache,
    const uint16_t *v_cache, int64_t pos, int64_t D, float *const *scores, float *const *out) {
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t keys = pos + 1;
    int64_t whole = 0;
    for (; whole + 8 <= pos; whole += 8) score8(q, G, k_cache + whole * D, D, scale, scores, whole);
    float inv[HEADS_AT_ONCE];
    for (int h = 0; h < G; h++) {
        float *sh = scores[h];
        int64_t j = whole;
        for (; j < keys; j++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) {
                const __m256 kji =
                    j < pos ? load_half8(k_cache + j * D + i) : _mm256_loadu_ps(k + i);
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + i), kji, acc);
            }
            sh[j] = hsum(acc) * scale;
        }
        for (j = keys; j % 8; j++) sh[j] = -INFINITY; /* pad to whole vectors */
        __m256 top = _mm256_set1_ps(-INFINITY);
        for (j = 0; j < keys; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(sh + j));
        top = _mm256_set1_ps(hmax(top));
        __m256 total = _mm256_setzero_ps();
        for (j = 0; j < keys; j += 8) {
            const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sh + j), top));
            /* the padding's -inf - top clamps to e^-87, not 0: zero it */
            const __m256 live =
                _mm256_cmp_ps(_mm256_loadu_ps(sh + j), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            const __m256 wj = _mm256_and_ps(e, live);
            _mm256_storeu_ps(sh + j, wj);
            total = _mm256_add_ps(total, wj);
        }
        inv[h] = 1.0f / hsum(total);
    }
    for (int64_t i0 = 0; i0 < D; i0 += 64) {
        float *o[HEADS_AT_ONCE];
        for (int h = 0; h < G; h++) o[h] = out[h] + i0;
        values64((const float *const *)scores, G, v_cache + i0, v + i0, pos, D, inv, o);
    }
}

/* Run M (1..MAX_M) decode tokens from their embedding rows through all L layers, the final
 * norm and the LM head; the matmuls by the kernels for M < gemm_from, else by the GEMMs, with
 * x rounded to int8 where int8 is set and the build has int8 tiles (INT8_X), else int16.
 *   ids [M]: the tokens; embed_qs, embed_d: the embedding's Q8_0 blocks [vocab, H];
 *   slots, positions [M]: each token's KV-cache slot and position; cos, sin_signed: RoPE
 *   tables [max_len, D], read at the positions.
 *   layers [L]: see LayerWeights; k_cache, v_cache: [L, num_slots, Hkv, max_len, D] fp16;
 *   each token's k and v are stored at its position, every layer.
 *   head_qs, head_d: the LM head's Q8_0 blocks [V, H]; logits [M, V] out.
 * D a multiple of 64, at most 256; H, I and Hq * D multiples of 32. Returns 0, -1 when
 * scratch memory could not be allocated, -2 for M outside 1..MAX_M or over MAX_M_KERNEL
 * below gemm_from. */
int decode_layers(const int64_t *ids, int64_t M, int64_t gemm_from, int int8,
                  const int8_t *embed_qs,
                  const uint16_t *embed_d, const int64_t *slots, const int64_t *positions,
                  const float *cos, const float *sin_signed, const LayerWeights *layers,
                  int64_t L, const float *final_norm, const int8_t *head_qs,
                  const uint16_t *head_d, int64_t V, int64_t H, int64_t Hq, int64_t Hkv, int64_t D,
                  int64_t I, float eps, uint16_t *k_cache, uint16_t *v_cache, int64_t num_slots,
                  int64_t max_len, float *logits) {
    const int gemm = M >= gemm_from;
    int8 = int8 && gemm && INT8_X;
    if (M < 1 || M > MAX_M || (!gemm && M > MAX_M_KERNEL)) return -2;
    const int64_t width = (Hq + 2 * Hkv) * D, group = Hq / Hkv;
    int64_t widest = H > I ? H : I;
    widest = widest > Hq * D ? widest : Hq * D;
    /* shared: each matmul's output */
    float *qkv = malloc(M * width * sizeof(float)), *att = malloc(M * Hq * D * sizeof(float));
    float *delta = malloc(M * H * sizeof(float)), *act = malloc(M * I * sizeof(float));
    /* per thread: the residual, a normed row, its quantised or packed form (and a panel),
     * attention scores */
    const int threads = omp_get_max_threads();
    const int64_t operand =
        gemm ? packed_floats(M, widest) + panel_floats(widest) : M * widest / 32 * 2;
    const int64_t own = M * H + M * widest + operand + HEADS_AT_ONCE * (max_len + 8);
    /* the query heads of a KV head, in parts of up to HEADS_AT_ONCE (attention's items) */
    const int64_t parts = (group + HEADS_AT_ONCE - 1) / HEADS_AT_ONCE;
    float *scratch = malloc(threads * own * sizeof(float));
    int16_t *qscratch = gemm ? NULL : malloc(threads * M * widest * sizeof(int16_t));
    int failed = !qkv || !att || !delta || !act || !scratch || (!gemm && !qscratch);
    if (!failed) {
#pragma omp parallel
        {
            const int t = omp_get_thread_num();
            float *xr = scratch + t * own, *normed = xr + M * H, *scores = normed + M * widest;
            Operand op = {gemm, int8, {NULL, NULL, NULL}, NULL, NULL};
            if (gemm) {
                op.xt = scores;
                op.panel = op.xt + packed_floats(M, widest);
            } else {
                op.qx.q = qscratch + t * M * widest;
                op.qx.scale = scores;
                op.qx.sum = scores + M * widest / 32;
            }
            scores += operand;
            for (int64_t r = 0; r < M; r++) { /* the embedding row, as dequantize_q8_0 */
                const int8_t *eq = embed_qs + ids[r] * H;
                const uint16_t *ed = embed_d + ids[r] * (H / 32);
                for (int64_t i = 0; i < H; i++) xr[r * H + i] = (float)eq[i] * half1(ed[i / 32]);
            }
            for (int64_t l = 0; l < L; l++) {
                const LayerWeights *lw = layers + l;
                for (int64_t r = 0; r < M; r++)
                    add_rms_norm_row(xr + r * H, NULL, H, lw->attn_norm, eps, normed + r * H);
                prepare(normed, M, H, &op);
                team_matmul(&lw->wqkv, &op, M, H, width, qkv);
#pragma omp for schedule(static)
                for (int64_t item = 0; item < M * Hkv * parts; item++) {
                    /* token r, KV head g, its query heads h0 .. h0 + G */
                    const int64_t r = item / (Hkv * parts), g = item / parts % Hkv;
                    const int64_t h0 = g * group + item % parts * HEADS_AT_ONCE;
                    const int G = (g + 1) * group - h0 < HEADS_AT_ONCE
                                      ? (int)((g + 1) * group - h0) : HEADS_AT_ONCE;
                    const float *row = qkv + r * width, *c = cos + positions[r] * D,
                                *s = sin_signed + positions[r] * D;
                    const int64_t base =
                        (((l * num_slots + slots[r]) * Hkv + g) * max_len) * D;
                    float q[HEADS_AT_ONCE][256], k[256], v[256];
                    uint16_t k16[256], v16[256];
                    const float *qh[HEADS_AT_ONCE] = {NULL};
                    float *sh[HEADS_AT_ONCE] = {NULL}, *oh[HEADS_AT_ONCE] = {NULL};
                    for (int i = 0; i < G; i++) {
                        rope_head(row + (h0 + i) * D, c, s, D, q[i]);
                        qh[i] = q[i];
                        sh[i] = scores + i * (max_len + 8);
                        oh[i] = att + r * Hq * D + (h0 + i) * D;
                    }
                    rope_head(row + (Hq + g) * D, c, s, D, k);
                    /* the token's own k and v as the cache keeps them, so that a later step
                     * and the per-op path (which reads them back) see the same values */
                    to_half(k, D, k16);
                    to_half(row + (Hq + Hkv + g) * D, D, v16);
                    for (int64_t i = 0; i < D; i += 8) {
                        _mm256_storeu_ps(k + i, load_half8(k16 + i));
                        _mm256_storeu_ps(v + i, load_half8(v16 + i));
                    }
                    const uint16_t *kc = k_cache + base, *vc = v_cache + base;
                    if (G == 1)
                        attend_heads(qh, 1, k, v, kc, vc, positions[r], D, sh, oh);
#if HEADS_AT_ONCE == 3
                    else if (G == 2)
                        attend_heads(qh, 2, k, v, kc, vc, positions[r], D, sh, oh);
                    else
                        attend_heads(qh, 3, k, v, kc, vc, positions[r], D, sh, oh);
#endif
                    if (h0 == g * group) { /* one writer per KV head; no one reads this row */
                        for (int64_t i = 0; i < D; i++) {
                            k_cache[base + positions[r] * D + i] = k16[i];
                            v_cache[base + positions[r] * D + i] = v16[i];
                        }
                    }
                }
                prepare(att, M, Hq * D, &op);
                team_matmul(&lw->wo, &op, M, Hq * D, H, delta);
                for (int64_t r = 0; r < M; r++)
                    add_rms_norm_row(xr + r * H, delta + r * H, H, lw->ffn_norm, eps,
                                     normed + r * H);
                prepare(normed, M, H, &op);
                team_matmul_swiglu(&lw->w13, &op, M, H, I, act);
                prepare(act, M, I, &op);
                team_matmul(&lw->w2, &op, M, I, H, delta);
                for (int64_t i = 0; i < M * H; i++) xr[i] += delta[i];
            }
            for (int64_t r = 0; r < M; r++)
                add_rms_norm_row(xr + r * H, NULL, H, final_norm, eps, normed + r * H);
            prepare(normed, M, H, &op);
            const BlockWeights head = {head_qs, head_d, NULL};
            team_matmul(&head, &op, M, H, V, logits);
        }
    }
    free(qkv);
    free(att);
    free(delta);
    free(act);
    free(scratch);
    free(qscratch);
    return failed ? -1 : 0;
}

/* ---- Sampling: inverse CDF over a row of logits ------------------------------------------
 *
 * The sampler's softmax, cumsum and searchsorted over [rows, 49152] took ~0.5 ms a row in
 * torch (each op allocates a fresh 3 MB tensor at 16 rows, and faults its pages in), 3-8 ms
 * of a 16-token step. Here: the row's max, then each block of 64 tokens' mass
 * exp((logit - max) / T) summed (a vector exp; -inf has no mass), then a walk over the block
 * sums to the block where the running mass passes u * total, and through that block's tokens.
 * No allocation but the block sums. */

#define SAMPLE_BLOCK 64

/* e^((x - top) * inv_t) for 8 logits, 0 where x is -inf. */
static inline __m256 mass8(const float *x, __m256 top, __m256 inv_t) {
    const __m256 v = _mm256_loadu_ps(x);
    const __m256 e = exp_neg(_mm256_mul_ps(_mm256_sub_ps(v, top), inv_t));
    return _mm256_and_ps(e, _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
}

static inline float mass1(float x, float top, float inv_t) {
    return x == -INFINITY ? 0.0f : expf((x - top) * inv_t);
}

/* For each r < R, row rows[r] of logits [*, V] at temperature temps[r] (> 0) and a uniform
 * u[r] in [0, 1): the first token whose running mass exceeds u * the row's total mass, into
 * out[r] (a token with mass always: the walk's block's last one if the lanes' sum and the
 * walk round apart; 0 for a row that is all -inf). Returns 0, or -1 without memory. */
int sample_rows(const float *logits, int64_t V, const int64_t *rows, int64_t R,
                const float *temps, const float *u, int64_t *out) {
    const int64_t blocks = V / SAMPLE_BLOCK, tail = blocks * SAMPLE_BLOCK;
    const int threads = omp_get_max_threads();
    float *sums = malloc(threads * (blocks + 1) * sizeof(float));
    if (!sums) return -1;
#pragma omp parallel for schedule(static) if (R > 1)
    for (int64_t r = 0; r < R; r++) {
        const float *x = logits + rows[r] * V;
        float *bs = sums + omp_get_thread_num() * (blocks + 1);
        __m256 top8 = _mm256_set1_ps(-INFINITY);
        for (int64_t i = 0; i + 8 <= V; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + i));
        float top = hmax(top8);
        for (int64_t i = V / 8 * 8; i < V; i++) top = x[i] > top ? x[i] : top;
        if (top == -INFINITY) {
            out[r] = 0;
            continue;
        }
        const float inv_t = 1.0f / temps[r];
        const __m256 top_v = _mm256_set1_ps(top), inv_v = _mm256_set1_ps(inv_t);
        double total = 0.0;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + b * SAMPLE_BLOCK;
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < SAMPLE_BLOCK; j += 8) acc = _mm256_add_ps(acc, mass8(xb + j, top_v, inv_v));
            bs[b] = hsum(acc);
            total += bs[b];
        }
        bs[blocks] = 0.0f;
        for (int64_t i = tail; i < V; i++) bs[blocks] += mass1(x[i], top, inv_t);
        total += bs[blocks];
        const double target = u[r] * total;
        double run = 0.0;
        int64_t b = 0;
        while (b <= blocks && run + bs[b] <= target) run += bs[b++];
        /* b <= blocks: run ends at total, and target = u * total is below it */
        float mass[SAMPLE_BLOCK]; /* the block's masses, as its sum had them */
        const int64_t first = b * SAMPLE_BLOCK, n = b < blocks ? SAMPLE_BLOCK : V - tail;
        if (b < blocks)
            for (int j = 0; j < SAMPLE_BLOCK; j += 8)
                _mm256_storeu_ps(mass + j, mass8(x + first + j, top_v, inv_v));
        else
            for (int64_t j = 0; j < n; j++) mass[j] = mass1(x[first + j], top, inv_t);
        int64_t pick = -1;
        for (int64_t j = 0; j < n; j++) {
            if (mass[j] <= 0.0f) continue;
            pick = first + j; /* the last token with mass, if rounding leaves the walk short */
            run += mass[j];
            if (run > target) break;
        }
        out[r] = pick;
    }
    free(sums);
    return 0;
}

/* 8 fp32 -> bf16, rounded to nearest even (finite values) */
static inline __m128i bf16_8(__m256 w) {
    const __m256i bits = _mm256_castps_si256(w);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    const __m256i top = _mm256_srli_epi32(up, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
}

/* Q4_1 W [N, K] as bf16 (w = q * d + m in fp32, rounded to nearest even, as torch rounds):
 * on CPUs with AMX, prompts' matmuls multiply bf16 x by these in torch (oneDNN's AMX GEMM,
 * about twice the block GEMM's speed there from 64 rows of x), and oneDNN takes no 4-bit
 * blocks. By hand because no torch op unpacks GGUF's nibble order; torch ops took ~6x as
 * long. Bound by writing the result (~12 GB/s): AVX-512 was no faster. */
void q4_1_to_bf16(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t N, int64_t K,
                  uint16_t *out) {
    const int64_t nb = K / 32;
    const __m256i low = _mm256_set1_epi32(0x0f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = n * nb; b < (n + 1) * nb; b++) {
            const uint8_t *q = qs + b * 16; /* byte j: element j (low nibble), j + 16 (high) */
            uint16_t *o = out + b * 32;
            const __m256 scale = _mm256_set1_ps(half1(d[b])), min = _mm256_set1_ps(half1(m[b]));
            for (int j = 0; j < 16; j += 8) {
                const __m256i bytes =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + j)));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
                _mm_storeu_si128((__m128i *)(o + j), bf16_8(_mm256_fmadd_ps(lo, scale, min)));
                _mm_storeu_si128((__m128i *)(o + 16 + j), bf16_8(_mm256_fmadd_ps(hi, scale, min)));
            }
        }
    }
}

/* act[M, I] = silu(gate) * up from [gate | up] bf16 [M, 2 * I] (the bf16 MLP input matmul's
 * product), in fp32: one pass where widening, chunk, silu and mul in torch made four, each
 * writing a fresh tensor. */
void swiglu_bf16(const uint16_t *gu, int64_t M, int64_t I, float *act) {
#pragma omp parallel for schedule(static) if (M * I >= 65536)
    for (int64_t r = 0; r < M; r++) {
        const uint16_t *g = gu + r * 2 * I, *u = g + I;
        float *o = act + r * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(g + i))), 16));
            const __m256 uv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(u + i))), 16));
            _mm256_storeu_ps(o + i, silu_times(gv, uv));
        }
        for (; i < I; i++) {
            union {
                uint32_t bits;
                float value;
            } gs = {(uint32_t)g[i] << 16}, us = {(uint32_t)u[i] << 16};
            o[i] = gs.value / (1.0f + expf(-gs.value)) * us.value;
        }
    }
}
