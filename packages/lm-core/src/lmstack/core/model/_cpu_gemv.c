/* lmstack's CPU matrix-vector product for float32 inference (see _cpu_gemv.py).
 *
 * y[i, j] = sum_k x[i, k] * w[j, k] (+ bias[j]) for a handful of rows i: the weight is read once,
 * row by row, while the few input rows stay in L1. Decoding one sequence multiplies every weight by a
 * single row, so the step is bound by how fast the weights stream from memory; a plain loop that the
 * compiler vectorises for this CPU (-O3 -march=native) streams them faster than oneDNN's or MKL's
 * general GEMM does at one row. Output rows are split across the OpenMP threads torch itself uses.
 */
#include <stddef.h>

static float lmstack_dot(const float *restrict w, const float *restrict x, long k) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long t = 0; t < k; ++t) s += w[t] * x[t];
    return s;
}

/* The ABI version _cpu_gemv.py checks before it calls anything. */
int lmstack_gemv_abi(void) { return 1; }

void lmstack_gemv_f32(const float *w, const float *x, const float *bias, float *y, long m, long n, long k,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long j = 0; j < n; ++j) {
        const float *row = w + j * k;
        const float b = bias ? bias[j] : 0.0f;
        for (long i = 0; i < m; ++i) y[i * n + j] = lmstack_dot(row, x + i * k, k) + b;
    }
}
