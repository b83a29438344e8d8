/*
 * The elementwise steps around the prefill GEMM (model_runtime/prefill.py): a chunk of prompt rows
 * multiplies on the CPU's int8 matrix engine (torch._int_mm: oneDNN on AVX512-VNNI / AMX-INT8), and
 * these kernels prepare its operands and finish its result in one pass each, instead of three or four
 * PyTorch elementwise ops over [M, N] tensors:
 *   pf_quantize_rows: activations x [M, K] float32 -> int8 codes, one symmetric scale per row and chunk
 *                     of C values along K;
 *   pf_w4_to_i8:      our int4 weights (the dq kernel layout, group scales/zeros) -> int8 codes with one
 *                     scale per output channel and chunk of C values, into a reused scratch buffer (no
 *                     cached int8 copy); by a 16-entry table per group (w4_row_to_i8_lut) where the
 *                     group size allows, else value by value (the same bytes either way);
 *   pf_w4_to_bf16:    the same int4 weights dequantized to bfloat16 (the bf16 GEMM variant);
 *   pf_scale_rows:    one chunk's int32 GEMM result -> float32 y = acc * xs[m] * ws[n] (+ bias) (+= the
 *                     earlier chunks, or a residual).
 * Plain loops the compiler vectorises (the table look-up: AVX2 intrinsics); compiled with -ffp-contract=off so the dequantized values are
 * bit-identical to PyTorch's (c - 8) * s + z (tests compare them exactly).
 *
 * int4 layout (as csrc/dq_kernels.c): w [N, K/2] uint8; for each block of 64 values, 32 bytes: byte j =
 * value j (low nibble) | value j+32 (high nibble); codes 0..15, value = (code - 8) * s + z per group of G
 * values; s, z [N, K/G] bfloat16.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PF_ABI_VERSION 3

int pf_abi_version(void) { return PF_ABI_VERSION; }

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* one row: q = rint(x / d), d = amax / 127 (0 for an all-zero row); returns d */
static float quantize_row(const float* x, int64_t K, int8_t* q) {
    /* the largest |x| 8 lanes at a time: the compiler leaves an fmaxf reduction scalar (NaN rules), which made
       this pass 3/4 of the call (72 x 896 rows: 165 us); max is exact, so the same amax (a NaN is skipped,
       as by fmaxf: vmaxps returns its second operand when either is NaN) */
    __m256 m8 = _mm256_setzero_ps();
    int64_t k8 = 0;
    for (; k8 + 8 <= K; k8 += 8) m8 = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(x + k8)), m8);
    float lanes[8], amax = 0.f;
    _mm256_storeu_ps(lanes, m8);
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, lanes[i]);
    for (; k8 < K; k8++) amax = fmaxf(amax, fabsf(x[k8]));
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
#pragma omp simd
    for (int64_t k = 0; k < K; k++) q[k] = (int8_t)(int32_t)rintf(x[k] * id);
    return d;
}

/* x [M, K] float32 -> q [M, K] int8, xs [M, ceil(K / C)] float32: one scale per row and chunk of C values */
void pf_quantize_rows(const float* x, int64_t M, int64_t K, int64_t C, int8_t* q, float* xs, int nthreads) {
    const int64_t nc = (K + C - 1) / C;
#pragma omp parallel for schedule(static) num_threads(M >= 8 ? nthreads : 1)
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < nc; c++) {
            const int64_t k0 = c * C, len = K - k0 < C ? K - k0 : C;
            xs[m * nc + c] = quantize_row(x + m * K + k0, len, q + m * K + k0);
        }
}

/* one int4 row -> float32 values [K] */
static void w4_row(const uint8_t* wr, const uint16_t* s, const uint16_t* z, int64_t K, int64_t G, float* out) {
    for (int64_t b = 0; b < K; b += 64) {
        for (int64_t j = 0; j < 32; j++) {
            out[b + j] = (float)(wr[b / 2 + j] & 0x0F);
            out[b + j + 32] = (float)(wr[b / 2 + j] >> 4);
        }
    }
    for (int64_t g = 0; g < K / G; g++) {
        const float sg = bf16_to_f32(s[g]), zg = bf16_to_f32(z[g]);
        float* o = out + g * G;
#pragma omp simd
        for (int64_t i = 0; i < G; i++) o[i] = (o[i] - 8.f) * sg + zg;
    }
}

/* One int4 row -> int8 codes [K] + its chunk scales (ws[c * N], chunk-major), by table: within a group a value
   is a function of its 4-bit code alone, so each group's 16 requantized codes are computed once (the same
   float steps as w4_row + quantize_row, hence the same bytes) and the row's nibbles are looked up 32 at a
   time (vpshufb). A chunk's scale needs its largest |value|: |(c - 8) s + z| is convex in c, so over the
   codes a group holds it peaks at the group's smallest or largest code (vector min / max of the nibbles).
   Needs G % 32 == 0 (each 32-value half of a 64-value block in one group) and C % G == 0. */
/* half h (values 32h..32h+31) of an int4 row: the low nibbles of block h / 2 for even h, the high ones for odd h */
static inline __m256i half_codes(const uint8_t* wr, int64_t h) {
    const __m256i b = _mm256_loadu_si256((const __m256i*)(wr + (h / 2) * 32));
    return _mm256_and_si256((h & 1) ? _mm256_srli_epi16(b, 4) : b, _mm256_set1_epi8(0x0F));
}

static void w4_row_to_i8_lut(const uint8_t* wr, const uint16_t* s, const uint16_t* z, int64_t K, int64_t G,
                             int64_t C, int8_t* out, float* ws, int64_t ws_stride) {
    const int64_t halves = G / 32;  /* 32-value halves per group */
    for (int64_t k0 = 0, c = 0; k0 < K; k0 += C, c++) {
        const int64_t len = K - k0 < C ? K - k0 : C;
        float amax = 0.f;
        for (int64_t g = k0 / G; g < (k0 + len) / G; g++) {
            __m256i mn = _mm256_set1_epi8(15), mx = _mm256_setzero_si256();
            for (int64_t h = g * halves; h < (g + 1) * halves; h++) {  /* half h: values 32h..32h+31 */
                const __m256i v = half_codes(wr, h);
                mn = _mm256_min_epu8(mn, v);
                mx = _mm256_max_epu8(mx, v);
            }
            uint8_t lo8[32], hi8[32];
            _mm256_storeu_si256((__m256i*)lo8, mn);
            _mm256_storeu_si256((__m256i*)hi8, mx);
            uint8_t cmin = 15, cmax = 0;
            for (int i = 0; i < 32; i++) {
                cmin = lo8[i] < cmin ? lo8[i] : cmin;
                cmax = hi8[i] > cmax ? hi8[i] : cmax;
            }
            const float sg = bf16_to_f32(s[g]), zg = bf16_to_f32(z[g]);
            const float a = ((float)cmin - 8.f) * sg + zg, b = ((float)cmax - 8.f) * sg + zg;
            amax = fmaxf(amax, fmaxf(fabsf(a), fabsf(b)));
        }
        const float d = amax / 127.f;
        const float id = d > 0.f ? 1.f / d : 0.f;
        ws[c * ws_stride] = d;
        for (int64_t g = k0 / G; g < (k0 + len) / G; g++) {
            const float sg = bf16_to_f32(s[g]), zg = bf16_to_f32(z[g]);
            int8_t lut[16];
            for (int code = 0; code < 16; code++) lut[code] = (int8_t)(int32_t)rintf((((float)code - 8.f) * sg + zg) * id);
            const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)lut));
            for (int64_t h = g * halves; h < (g + 1) * halves; h++) {
                const __m256i v = half_codes(wr, h);
                _mm256_storeu_si256((__m256i*)(out + h * 32), _mm256_shuffle_epi8(t, v));
            }
        }
    }
}

/* int4 rows -> int8 codes [N, K] + scales ws [ceil(K / C), N] (chunk-major: one contiguous vector per
   chunk of C values along K): each chunk of a row's dequantized values requantized symmetrically.
   -1 on bad shapes or out of memory. */
int pf_w4_to_i8(const uint8_t* w, const uint16_t* s, const uint16_t* z, int64_t N, int64_t K, int64_t G,
                int64_t C, int8_t* out, float* ws, int nthreads) {
    if (K % 64 || G <= 0 || K % G || C <= 0) return -1;
    const int64_t nc = (K + C - 1) / C;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* tmp = (float*)malloc(sizeof(float) * (size_t)K);
        if (!tmp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!tmp) continue;
            if (G % 32 == 0 && C % G == 0) {
                w4_row_to_i8_lut(w + n * (K / 2), s + n * (K / G), z + n * (K / G), K, G, C, out + n * K, ws + n, N);
                continue;
            }
            w4_row(w + n * (K / 2), s + n * (K / G), z + n * (K / G), K, G, tmp);
            for (int64_t c = 0; c < nc; c++) {
                const int64_t k0 = c * C, len = K - k0 < C ? K - k0 : C;
                ws[c * N + n] = quantize_row(tmp + k0, len, out + n * K + k0);
            }
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}

/* int4 rows -> bfloat16 [N, K] (the values of pf_w4_to_i8 before requantization, rounded to bf16) */
int pf_w4_to_bf16(const uint8_t* w, const uint16_t* s, const uint16_t* z, int64_t N, int64_t K, int64_t G,
                  uint16_t* out, int nthreads) {
    if (K % 64 || G <= 0 || K % G) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float* tmp = (float*)malloc(sizeof(float) * (size_t)K);
        if (!tmp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!tmp) continue;
            w4_row(w + n * (K / 2), s + n * (K / G), z + n * (K / G), K, G, tmp);
            uint16_t* o = out + n * K;
            for (int64_t k = 0; k < K; k++) o[k] = f32_to_bf16(tmp[k]);
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}

/* y [M, N] = acc * xs[m * xs_stride] * ws[n] (+ bias[n]); accumulate: y += that (the earlier chunks, or
   a pre-norm block's residual) */
void pf_scale_rows(const int32_t* acc, int64_t M, int64_t N, const float* xs, int64_t xs_stride, const float* ws,
                   const float* bias, float* y, int accumulate, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(M * N >= 16384 ? nthreads : 1)
    for (int64_t m = 0; m < M; m++) {
        const int32_t* a = acc + m * N;
        float* yr = y + m * N;
        const float d = xs[m * xs_stride];
        if (bias && accumulate) {
#pragma omp simd
            for (int64_t n = 0; n < N; n++) yr[n] += (float)a[n] * d * ws[n] + bias[n];
        } else if (bias) {
#pragma omp simd
            for (int64_t n = 0; n < N; n++) yr[n] = (float)a[n] * d * ws[n] + bias[n];
        } else if (accumulate) {
#pragma omp simd
            for (int64_t n = 0; n < N; n++) yr[n] += (float)a[n] * d * ws[n];
        } else {
#pragma omp simd
            for (int64_t n = 0; n < N; n++) yr[n] = (float)a[n] * d * ws[n];
        }
    }
}
