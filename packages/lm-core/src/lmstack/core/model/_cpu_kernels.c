/* lmstack's CPU kernels for float32 decoding (see cpu_kernels.py, which compiles and loads this file).
 *
 * Decoding one sequence is a chain of small operations on one token: every weight matrix times one
 * row, a norm over a few hundred values, attention of one query over the cached keys. Torch's general
 * kernels pay a fixed cost per call that these sizes do not amortise, and its one-row GEMM streams the
 * weights slower than memory allows. These are plain loops the compiler vectorises for this CPU
 * (-O3 -march=native); the GEMV splits its output rows over the OpenMP threads torch itself uses.
 */
#include <math.h>
#include <stddef.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* The ABI version cpu_kernels.py checks before it calls anything. */
int lmstack_kernels_abi(void) { return 3; }

/* Dot products with explicit vectors where the CPU has AVX-512 or AVX2: four accumulators, one
 * horizontal sum per dot. Written as a plain loop under "omp simd", gcc reduced the 64 lanes of its
 * accumulators one scalar add at a time, which cost more than the products for rows of 512 (int8
 * codes: 3.0-3.5 ms a step for the 56M llama's matrices against 1.85-2.35 ms with these).
 *
 * Each instruction set defines its vector type and lane count, and how to load floats or int8 codes
 * into float lanes, multiply-add, add and sum the lanes; LMSTACK_DOT below is the one loop over them. */
#if defined(__AVX512F__)
int lmstack_kernels_isa(void) { return 512; }
#define LMSTACK_VECTORS 1
typedef __m512 lmstack_vec;
enum { LMSTACK_LANES = 16 };
#define LMSTACK_ZERO() _mm512_setzero_ps()
#define LMSTACK_LOAD_F32(p) _mm512_loadu_ps(p)
#define LMSTACK_LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define LMSTACK_FMA(a, b, acc) _mm512_fmadd_ps(a, b, acc)
#define LMSTACK_ADD(a, b) _mm512_add_ps(a, b)
#define LMSTACK_SUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
int lmstack_kernels_isa(void) { return 256; }
#define LMSTACK_VECTORS 1
typedef __m256 lmstack_vec;
enum { LMSTACK_LANES = 8 };

static inline float lmstack_hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

#define LMSTACK_ZERO() _mm256_setzero_ps()
#define LMSTACK_LOAD_F32(p) _mm256_loadu_ps(p)
#define LMSTACK_LOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define LMSTACK_FMA(a, b, acc) _mm256_fmadd_ps(a, b, acc)
#define LMSTACK_ADD(a, b) _mm256_add_ps(a, b)
#define LMSTACK_SUM(v) lmstack_hsum256(v)
#else
int lmstack_kernels_isa(void) { return 0; }
#endif

#ifdef LMSTACK_VECTORS
/* sum_i a[i] * b[i], a read through LOAD (float32 or int8 codes), b float32. */
#define LMSTACK_DOT(name, type, LOAD)                                                                     \
    static float name(const type *restrict a, const float *restrict b, long n) {                        \
        const long w = LMSTACK_LANES;                                                                   \
        lmstack_vec s0 = LMSTACK_ZERO(), s1 = s0, s2 = s0, s3 = s0;                                     \
        long i = 0;                                                                                     \
        for (; i + 4 * w <= n; i += 4 * w) {                                                            \
            s0 = LMSTACK_FMA(LOAD(a + i), LMSTACK_LOAD_F32(b + i), s0);                                 \
            s1 = LMSTACK_FMA(LOAD(a + i + w), LMSTACK_LOAD_F32(b + i + w), s1);                         \
            s2 = LMSTACK_FMA(LOAD(a + i + 2 * w), LMSTACK_LOAD_F32(b + i + 2 * w), s2);                 \
            s3 = LMSTACK_FMA(LOAD(a + i + 3 * w), LMSTACK_LOAD_F32(b + i + 3 * w), s3);                 \
        }                                                                                               \
        for (; i + w <= n; i += w) s0 = LMSTACK_FMA(LOAD(a + i), LMSTACK_LOAD_F32(b + i), s0);          \
        float s = LMSTACK_SUM(LMSTACK_ADD(LMSTACK_ADD(s0, s1), LMSTACK_ADD(s2, s3)));                   \
        for (; i < n; ++i) s += (float)a[i] * b[i];                                                     \
        return s;                                                                                       \
    }
#else
/* sum_i a[i] * b[i] as a plain loop the compiler vectorises as it can. */
#define LMSTACK_DOT(name, type, LOAD)                                                                   \
    static float name(const type *restrict a, const float *restrict b, long n) {                      \
        float s = 0.0f;                                                                               \
        _Pragma("omp simd reduction(+ : s)") for (long i = 0; i < n; ++i) s += (float)a[i] * b[i];    \
        return s;                                                                                     \
    }
#endif

LMSTACK_DOT(lmstack_dot, float, LMSTACK_LOAD_F32)
LMSTACK_DOT(lmstack_dot_i8, signed char, LMSTACK_LOAD_I8)

/* y[i, j] = sum_k x[i, k] * w[j, k] (+ bias[j]): the weight is read once, row by row, while the few
 * input rows stay in L1. */
void lmstack_gemv_f32(const float *w, const float *x, const float *bias, float *y, long m, long n, long k,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long j = 0; j < n; ++j) {
        const float *row = w + j * k;
        const float b = bias ? bias[j] : 0.0f;
        for (long i = 0; i < m; ++i) y[i * n + j] = lmstack_dot(row, x + i * k, k) + b;
    }
}

/* y[i, j] = scales[j] * sum_k x[i, k] * q[j, k] (+ bias[j]): int8 codes with one scale per output row
 * (weight-only int8), a quarter of the float32 matrix's bytes to stream. */
void lmstack_gemv_i8_f32(const signed char *q, const float *scales, const float *x, const float *bias, float *y,
                         long m, long n, long k, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long j = 0; j < n; ++j) {
        const signed char *row = q + j * k;
        const float b = bias ? bias[j] : 0.0f;
        for (long i = 0; i < m; ++i) y[i * n + j] = scales[j] * lmstack_dot_i8(row, x + i * k, k) + b;
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w, row by row. */
void lmstack_rms_norm_f32(const float *x, const float *w, float *y, long rows, long n, float eps) {
    for (long r = 0; r < rows; ++r) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        const float scale = 1.0f / sqrtf(lmstack_dot(xr, xr, n) / (float)n + eps);
#pragma omp simd
        for (long i = 0; i < n; ++i) yr[i] = (xr[i] * scale) * w[i];
    }
}

/* One query token of hq heads against keys t0..t1-1 of one sequence, grouped-query (head h reads kv
 * head h / (hq / hkv)). Key t of kv head g is at k + t * slot_stride + g * head_stride, and so is its
 * value in v. scratch holds hq * (t1 - t0) floats. */
void lmstack_decode_attention_f32(const float *q, const float *k, const float *v, float *out,
                                  float *scratch, long hq, long hkv, long d, long t0, long t1,
                                  long slot_stride, long head_stride, float scale, int threads) {
    const long group = hq / hkv, len = t1 - t0;
    /* Threads only pay off on long contexts: waking them costs more than a short head's work. */
#pragma omp parallel for schedule(static) num_threads(threads) if (len * hq * d > (1L << 18))
    for (long h = 0; h < hq; ++h) {
        const float *qh = q + h * d;
        const long off = (h / group) * head_stride;
        float *s = scratch + h * len;
        float top = -INFINITY;
        for (long t = 0; t < len; ++t) {
            s[t] = scale * lmstack_dot(qh, k + (t0 + t) * slot_stride + off, d);
            top = s[t] > top ? s[t] : top;
        }
        float total = 0.0f;
        for (long t = 0; t < len; ++t) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        float *oh = out + h * d;
        for (long i = 0; i < d; ++i) oh[i] = 0.0f;
        for (long t = 0; t < len; ++t) {
            const float p = s[t] / total;
            const float *vt = v + (t0 + t) * slot_stride + off;
#pragma omp simd
            for (long i = 0; i < d; ++i) oh[i] += p * vt[i];
        }
    }
}
