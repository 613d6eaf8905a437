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

/* The ABI version cpu_kernels.py checks before it calls anything. */
int lmstack_kernels_abi(void) { return 2; }

static float lmstack_dot(const float *restrict a, const float *restrict b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

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
