/*
 * A row's RMSNorm, shared by the decode kernels (dq_kernels.c) and the prompt GEMM's quantization pass
 * (prefill_kernels.c): the same instructions in both, so a row is normalised to the same values whichever kernel
 * multiplies it. Both libraries' build hashes include this file (ckernels.HEADER).
 */
#ifndef DISTILLERY_ROW_NORM_H
#define DISTILLERY_ROW_NORM_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float hsum_ps(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* x * rsqrt(mean(x^2) + eps) * w of one row of K values (K % 8 == 0), so a pre-norm block's normalised activations
   never round-trip through memory */
static inline void rms_norm_row(const float* x, int64_t K, const float* w, float eps, float* out) {
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < K; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    const __m256 r = _mm256_set1_ps(1.f / sqrtf(hsum_ps(ss) / (float)K + eps));
    for (int64_t i = 0; i < K; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), r), _mm256_loadu_ps(w + i)));
}
#endif
