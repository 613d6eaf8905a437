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
int lmstack_kernels_abi(void) { return 4; }

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
#define LMSTACK_SET1(x) _mm512_set1_ps(x)
#define LMSTACK_STORE(p, v) _mm512_storeu_ps(p, v)
#define LMSTACK_MUL(a, b) _mm512_mul_ps(a, b)
#define LMSTACK_MAX(a, b) _mm512_max_ps(a, b)
#define LMSTACK_ROUND(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LMSTACK_POW2(r, n) _mm512_scalef_ps(r, n)
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
#define LMSTACK_SET1(x) _mm256_set1_ps(x)
#define LMSTACK_STORE(p, v) _mm256_storeu_ps(p, v)
#define LMSTACK_MUL(a, b) _mm256_mul_ps(a, b)
#define LMSTACK_MAX(a, b) _mm256_max_ps(a, b)
#define LMSTACK_ROUND(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* r * 2^n for integral n >= -126: n added to the exponent bits of 1.0. */
#define LMSTACK_POW2(r, n)                                                                              \
    _mm256_mul_ps(r, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),     \
                                                                            _mm256_set1_epi32(127)), 23)))
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

#ifdef LMSTACK_VECTORS
/* exp(x) for x <= 0 (scores minus their maximum): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor
 * polynomial to r^7 (relative error under 2e-7 on that range), times 2^n. Below -87 the result is
 * flushed toward 0 (about 1e-38), which a softmax weight that small is anyway. */
static inline lmstack_vec lmstack_exp(lmstack_vec x) {
    x = LMSTACK_MAX(x, LMSTACK_SET1(-87.0f));
    const lmstack_vec n = LMSTACK_ROUND(LMSTACK_MUL(x, LMSTACK_SET1(1.44269504f)));
    /* r = x - n ln2, with ln2 split in two so that n * ln2's rounding does not reach r. */
    lmstack_vec r = LMSTACK_FMA(n, LMSTACK_SET1(-0.693145752f), x);
    r = LMSTACK_FMA(n, LMSTACK_SET1(-1.42860677e-6f), r);
    lmstack_vec p = LMSTACK_SET1(1.0f / 5040.0f);
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(1.0f / 720.0f));
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(1.0f / 120.0f));
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(1.0f / 24.0f));
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(1.0f / 6.0f));
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(0.5f));
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(1.0f));
    p = LMSTACK_FMA(p, r, LMSTACK_SET1(1.0f));
    return LMSTACK_POW2(p, n);
}
#endif

/* s[j] = exp(s[j] - top) for j < n; returns their sum. */
static float lmstack_exp_run(float *restrict s, long n, float top) {
    float total = 0.0f;
    long j = 0;
#ifdef LMSTACK_VECTORS
    const lmstack_vec t = LMSTACK_SET1(top);
    lmstack_vec sum = LMSTACK_ZERO();
    for (; j + LMSTACK_LANES <= n; j += LMSTACK_LANES) {
        const lmstack_vec e = lmstack_exp(LMSTACK_ADD(LMSTACK_LOAD_F32(s + j), LMSTACK_MUL(t, LMSTACK_SET1(-1.0f))));
        LMSTACK_STORE(s + j, e);
        sum = LMSTACK_ADD(sum, e);
    }
    total = LMSTACK_SUM(sum);
#endif
    for (; j < n; ++j) {
        s[j] = expf(s[j] - top);
        total += s[j];
    }
    return total;
}

/* acc[x] += sum_j p[j] * v[j * stride + x] for x < d: each slice of acc stays in registers while the
 * values stream past it. Paged attention calls it one key at a time (n = 1), sweeping a slot's heads in
 * order, which reads the cache sequentially: that measured faster than a run of keys per head. */
static void lmstack_weighted_sum(float *restrict acc, const float *restrict p, const float *restrict v, long n,
                                 long stride, long d) {
    long x = 0;
#ifdef LMSTACK_VECTORS
    const long w = LMSTACK_LANES;
    for (; x + 4 * w <= d; x += 4 * w) {
        lmstack_vec a0 = LMSTACK_LOAD_F32(acc + x), a1 = LMSTACK_LOAD_F32(acc + x + w);
        lmstack_vec a2 = LMSTACK_LOAD_F32(acc + x + 2 * w), a3 = LMSTACK_LOAD_F32(acc + x + 3 * w);
        for (long j = 0; j < n; ++j) {
            const lmstack_vec pj = LMSTACK_SET1(p[j]);
            const float *vj = v + j * stride + x;
            a0 = LMSTACK_FMA(pj, LMSTACK_LOAD_F32(vj), a0);
            a1 = LMSTACK_FMA(pj, LMSTACK_LOAD_F32(vj + w), a1);
            a2 = LMSTACK_FMA(pj, LMSTACK_LOAD_F32(vj + 2 * w), a2);
            a3 = LMSTACK_FMA(pj, LMSTACK_LOAD_F32(vj + 3 * w), a3);
        }
        LMSTACK_STORE(acc + x, a0), LMSTACK_STORE(acc + x + w, a1);
        LMSTACK_STORE(acc + x + 2 * w, a2), LMSTACK_STORE(acc + x + 3 * w, a3);
    }
    for (; x + w <= d; x += w) {
        lmstack_vec a = LMSTACK_LOAD_F32(acc + x);
        for (long j = 0; j < n; ++j) a = LMSTACK_FMA(LMSTACK_SET1(p[j]), LMSTACK_LOAD_F32(v + j * stride + x), a);
        LMSTACK_STORE(acc + x, a);
    }
#endif
    for (; x < d; ++x) {
        float a = acc[x];
        for (long j = 0; j < n; ++j) a += p[j] * v[j * stride + x];
        acc[x] = a;
    }
}

/* Longest run of keys scored at once per head (a block is read in runs of at most this many). */
enum { LMSTACK_KEY_RUN = 64 };

/* Query tokens over a paged cache: row r's query (hq heads of d) attends to keys row_start[r] ..
 * row_end[r] - 1 of its sequence, whose table (tables + row_table[r] * table_stride) maps key t to
 * cache slot table[t / block_size] * block_size + t % block_size. Key t of kv head g is at
 * k + slot * hkv * d + g * d, and so is its value in v. Grouped-query: head h reads kv head
 * h / (hq / hkv). Decode rows (one query of a sequence) and prefill chunks (consecutive rows of one
 * sequence, each ending at its own position: causal) are the same call; nothing is gathered.
 *
 * With many rows, a work item is a row, and each run of keys is read for all kv heads at once (one
 * contiguous stretch of the cache). With few rows (one sequence decoding), an item is a (row, kv
 * head), so that every thread has work. Decoding many sequences is bound by memory: 64 sequences of
 * 400 keys on blocks scattered over a 64 MB cache read 16-18 GB/s on two threads here (11-13 GB/s when
 * each kv head took its own pass over the slots), against 36-50 GB/s when they fit in the CPU's caches.
 * Software prefetching of the next block did not change it.
 * Softmax is online over runs of keys (a running maximum and sum per head), so no buffer grows with
 * the context; each thread keeps its sums and scores (hq * (d + 2 + LMSTACK_KEY_RUN) floats) on its stack. */
void lmstack_paged_attention_f32(const float *q, float *out, const float *k, const float *v,
                                 const int *tables, long table_stride, const int *row_table,
                                 const int *row_start, const int *row_end, long rows,
                                 long hq, long hkv, long d, long block_size, float scale, int threads) {
    const long group = hq / hkv, slot_stride = hkv * d;
    const long span = rows >= 2L * threads ? hkv : 1; /* kv heads per item */
    const long splits = hkv / span, heads = span * group;
#pragma omp parallel num_threads(threads)
    {
        float mine[heads * (d + 2 + LMSTACK_KEY_RUN)];
        float *acc = mine, *top = acc + heads * d, *total = top + heads, *s = total + heads;
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < rows * splits; ++item) {
            const long r = item / splits, first = (item % splits) * span; /* first kv head */
            const int *table = tables + (long)row_table[r] * table_stride;
            const long t1 = row_end[r];
            const float *qr = q + (r * hq + first * group) * d;
            for (long i = 0; i < heads * d; ++i) acc[i] = 0.0f;
            for (long i = 0; i < heads; ++i) top[i] = -INFINITY, total[i] = 0.0f;
            for (long t = row_start[r]; t < t1;) {
                const long block = t / block_size;
                long end = (block + 1) * block_size;
                end = end < t1 ? end : t1;
                end = end < t + LMSTACK_KEY_RUN ? end : t + LMSTACK_KEY_RUN;
                const long n = end - t;
                const long base = ((long)table[block] * block_size + t % block_size) * slot_stride + first * d;
                /* Key by key, then value by value: each slot's heads are read in one sequential sweep. */
                const float *kb = k + base, *vb = v + base;
                for (long j = 0; j < n; ++j)
                    for (long i = 0; i < heads; ++i)
                        s[i * LMSTACK_KEY_RUN + j] = scale * lmstack_dot(kb + j * slot_stride + (i / group) * d,
                                                                         qr + i * d, d);
                for (long i = 0; i < heads; ++i) {
                    float *si = s + i * LMSTACK_KEY_RUN, *ai = acc + i * d;
                    float best = top[i];
                    for (long j = 0; j < n; ++j) best = si[j] > best ? si[j] : best;
                    if (best > top[i]) { /* rescale what was summed under the old maximum */
                        const float c = expf(top[i] - best);
                        total[i] *= c;
#pragma omp simd
                        for (long x = 0; x < d; ++x) ai[x] *= c;
                        top[i] = best;
                    }
                    total[i] += lmstack_exp_run(si, n, best);
                }
                for (long j = 0; j < n; ++j)
                    for (long i = 0; i < heads; ++i)
                        lmstack_weighted_sum(acc + i * d, s + i * LMSTACK_KEY_RUN + j,
                                             vb + j * slot_stride + (i / group) * d, 1, slot_stride, d);
                t = end;
            }
            float *o = out + (r * hq + first * group) * d;
            for (long i = 0; i < heads; ++i) {
                /* An empty range (no key) gives zeros rather than a division by zero. */
                const float inv = total[i] > 0.0f ? 1.0f / total[i] : 0.0f;
#pragma omp simd
                for (long x = 0; x < d; ++x) o[i * d + x] = acc[i * d + x] * inv;
            }
        }
    }
}
