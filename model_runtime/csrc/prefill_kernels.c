/*
 * The prefill GEMM's helpers (model_runtime/prefill.py): a chunk of prompt rows multiplies on the CPU's
 * int8 matrix engine (torch._int_mm: oneDNN on AMX-INT8; pf_w8_gemm below on AVX512-VNNI, pf_w8_gemm_avx2 on
 * AVX2 alone), and these
 * kernels prepare its operands and finish its result in one pass each, instead of three or four
 * PyTorch elementwise ops over [M, N] tensors:
 *   pf_quantize_rows: activations x [M, K] float32 (RMSNorm'd first if asked) -> int8 codes, one
 *                     symmetric scale per row and chunk of C values along K;
 *   pf_w4_to_i8:      our int4 weights (the dq kernel layout, group scales/zeros) -> int8 codes with one
 *                     scale per output channel and chunk of C values, into a reused scratch buffer (no
 *                     cached int8 copy); by a 16-entry table per group (w4_row_to_i8_lut) where the
 *                     group size allows, else value by value (the same bytes either way);
 *   pf_w4_to_bf16:    the same int4 weights dequantized to bfloat16 (the bf16 GEMM variant);
 *   pf_scale_rows:    one chunk's int32 GEMM result -> float32 y = acc * xs[m] * ws[n] (+ bias) (+= the
 *                     earlier chunks, or a residual);
 *   pf_w8_gemm:       the int8 GEMM itself where the CPU has AVX512-VNNI and no AMX, every chunk and its
 *                     finish in one call (the same bytes as _int_mm + pf_scale_rows; see its comment);
 *   pf_w8_gemm_avx2:  the same on AVX2 without VNNI (the same bytes again);
 *   pf_w4_gemm_avx2:  int4 weights' own codes on AVX2 (no requantization; int16 sums of 32 values).
 * Plain loops the compiler vectorises (the table look-up: AVX2 intrinsics); compiled with -ffp-contract=off so the dequantized values are
 * bit-identical to PyTorch's (c - 8) * s + z (tests compare them exactly).
 *
 * int4 layout (as csrc/dq_kernels.c): w [N, K/2] uint8; for each block of 64 values, 32 bytes: byte j =
 * value j (low nibble) | value j+32 (high nibble); codes 0..15, value = (code - 8) * s + z per group of G
 * values; s, z [N, K/G] bfloat16.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_norm.h"  /* rms_norm_row: the decode kernels' instructions (a row normalised the same either way) */

#define PF_ABI_VERSION 8

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

/* x [M, K] float32 -> q [M, K] int8, xs [M, ceil(K / C)] float32: one scale per row and chunk of C values; with
   norm_w, each row RMSNorm'd first (K % 8 == 0: the caller checks), so a pre-norm block's linear takes its input
   in one pass instead of a PyTorch norm before it. -1: out of memory. */
int pf_quantize_rows(const float* x, int64_t M, int64_t K, int64_t C, const float* norm_w, float eps, int8_t* q,
                     float* xs, int nthreads) {
    const int64_t nc = (K + C - 1) / C;
    int failed = 0;
#pragma omp parallel num_threads(M >= 8 ? nthreads : 1)
    {
        float* tmp = norm_w ? (float*)malloc(sizeof(float) * (size_t)K) : NULL;
        if (norm_w && !tmp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float* row = x + m * K;
            if (norm_w) {
                if (!tmp) continue;
                rms_norm_row(row, K, norm_w, eps, tmp);
                row = tmp;
            }
            for (int64_t c = 0; c < nc; c++) {
                const int64_t k0 = c * C, len = K - k0 < C ? K - k0 : C;
                xs[m * nc + c] = quantize_row(row + k0, len, q + m * K + k0);
            }
        }
        free(tmp);
    }
    return failed ? -1 : 0;
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

/* ---- pf_w8_gemm: the int8 prompt GEMM on AVX512-VNNI without AMX ------------------------------------------------
 * y (+)= sum over chunks c of (float)(xq . w over chunk c) * xs[m, c] * ws[c, n] (+ bias[n] with chunk 0): the
 * product torch._int_mm gives chunk by chunk, finished as pf_scale_rows finishes it (the same exact integer sums,
 * the same float steps in the same order: the same bytes), in one call that reads the weights where they lie.
 * Why: oneDNN's _int_mm takes the [N, K] weights in PyTorch's layout and (by its timings: 8 rows read them at
 * 9-20 GB/s) reorders them on every call, and in a forward they come from memory: 64 prompt rows of the 0.5B over
 * cold weights 99 ms against ours 79 (Zen 4, 2 vCPUs).
 * How: as the decode kernels' 8-row panels (csrc/dq_kernels.c, w8q_panel): activation rows transposed in tiles of
 * 8 (one 512-bit register holds 8 rows x 8 consecutive codes, unsigned: code + 128), each weight row's 8 codes one
 * 64-bit broadcast, one vpdpbusd adding 8 rows' partial sums; here PG_NT weight rows x PG_RT tiles (32 rows) per
 * pass, the 128 x (weight sum of the chunk) that the unsigned codes add taken off at each chunk's end. Weight
 * panels are split between the threads; the activation rows go PG_ROW_BYTES at a time so that they stay in L2.
 * Needs K % 8 == 0 and C % 8 == 0 (the caller checks). */
#define PG_NT 4
#define PG_RT 4
#define PG_ROW_BYTES (384 * 1024)
#define PG_PREFETCH 2  /* panels ahead */
#define PG_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

/* tiles of 8 activation rows (8 K bytes each, transposed) one pass over the weights takes: whole groups of rt (a
   register pass's tiles) within PG_ROW_BYTES, so they stay in L2; at least one group. Both GEMMs' passes. */
static inline int64_t pg_tiles_per_pass(int64_t K, int64_t rt) {
    const int64_t fit = PG_ROW_BYTES / (8 * K) / rt * rt;
    return fit > 0 ? fit : rt;
}
typedef int64_t __attribute__((may_alias, aligned(1))) pg_i64u;

/* PG_NT weight rows (w + off[t]) x RT tiles of xt (tile r at xt + r * tstride dwords), codes [k0, k1): out[t][r].
   One function per RT (a macro): with the tile count a constant and the accumulators local, they stay in registers
   (a shared function taking rt compiled to register copies and spills around every vpdpbusd). */
#define PG_DOT(RT)                                                                                                    \
PG_TARGET static void pg_dot##RT(const int8_t* w, const int64_t* off, const uint32_t* xt, int64_t tstride,         \
                                 int64_t k0, int64_t k1, const int64_t* pfo, __m512i out[PG_NT][PG_RT]) {            \
    __m512i acc[PG_NT][RT];                                                                                           \
    _Pragma("GCC unroll 4") for (int t = 0; t < PG_NT; t++)                                                            \
        _Pragma("GCC unroll 4") for (int r = 0; r < RT; r++) acc[t][r] = _mm512_setzero_si512();                      \
    const int8_t* w0 = w + off[0]; const int8_t* w1 = w + off[1];                                                     \
    const int8_t* w2 = w + off[2]; const int8_t* w3 = w + off[3];                                                     \
    for (int64_t k64 = k0; k64 < k1; k64 += 64) {                                                                    \
      _Pragma("GCC unroll 4") for (int t = 0; t < PG_NT; t++) _mm_prefetch((const char*)(w + pfo[t] + k64), _MM_HINT_T1); \
      for (int64_t k8 = k64; k8 < k1 && k8 < k64 + 64; k8 += 8) {                                                     \
        __m512i xv[RT];                                                                                               \
        _Pragma("GCC unroll 4") for (int r = 0; r < RT; r++)                                                           \
            xv[r] = _mm512_load_si512((const void*)(xt + r * tstride + k8 * 2));                                      \
        const __m512i v0 = _mm512_set1_epi64(*(const pg_i64u*)(w0 + k8));                                            \
        const __m512i v1 = _mm512_set1_epi64(*(const pg_i64u*)(w1 + k8));                                            \
        const __m512i v2 = _mm512_set1_epi64(*(const pg_i64u*)(w2 + k8));                                            \
        const __m512i v3 = _mm512_set1_epi64(*(const pg_i64u*)(w3 + k8));                                            \
        _Pragma("GCC unroll 4") for (int r = 0; r < RT; r++) {                                                         \
            acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], xv[r], v0);                                                    \
            acc[1][r] = _mm512_dpbusd_epi32(acc[1][r], xv[r], v1);                                                    \
            acc[2][r] = _mm512_dpbusd_epi32(acc[2][r], xv[r], v2);                                                    \
            acc[3][r] = _mm512_dpbusd_epi32(acc[3][r], xv[r], v3);                                                    \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
    _Pragma("GCC unroll 4") for (int t = 0; t < PG_NT; t++)                                                            \
        _Pragma("GCC unroll 4") for (int r = 0; r < RT; r++) out[t][r] = acc[t][r];                                    \
}
PG_DOT(1)
PG_DOT(2)
PG_DOT(3)
PG_DOT(4)

/* the sums of PG_NT weight rows' codes k0..k1 - 1 (the 128 x that the unsigned activation codes add): the rows'
   chains interleaved (one row at a time waited on each vpdpbusd's latency: ~20% of a 24-row panel's time) */
PG_TARGET static inline void pg_code_sums(const int8_t* w, const int64_t* off, int64_t k0, int64_t k1, int32_t* out) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc[PG_NT];
    for (int t = 0; t < PG_NT; t++) acc[t] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 64) {
        const __mmask64 mask = k1 - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k1 - k)) - 1);
        for (int t = 0; t < PG_NT; t++)
            acc[t] = _mm512_dpbusd_epi32(acc[t], ones, _mm512_maskz_loadu_epi8(mask, w + off[t] + k));
    }
    for (int t = 0; t < PG_NT; t++) out[t] = _mm512_reduce_add_epi32(acc[t]);
}

/* chunk c's sums -> run[p][r] (lane 2m: row m x weight row 2p, lane 2m + 1: x weight row 2p + 1), as
   pf_scale_rows: v = (float)isum * xs * ws; chunk 0: v (+ bias), added to y's value first when accumulating */
PG_TARGET static inline __attribute__((always_inline)) void pg_finish(__m512i acc[PG_NT][PG_RT], int rt, int c,
        const int32_t* wsum, const float* ws, const float* bias, const float* xst, int64_t xst_tile,
        const float* yin, float run[PG_NT / 2][PG_RT][16]) {
    for (int p = 0; p < PG_NT / 2; p++) {
        const int t0 = 2 * p, t1 = 2 * p + 1;
        const __m512i comp = _mm512_mask_blend_epi32(0xAAAA, _mm512_set1_epi32(128 * wsum[t0]),
                                                     _mm512_set1_epi32(128 * wsum[t1]));
        const __m512 wsv = _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(ws[t0]), _mm512_set1_ps(ws[t1]));
        for (int r = 0; r < rt; r++) {
            const __m512i s0 = _mm512_add_epi32(acc[t0][r], _mm512_shuffle_epi32(acc[t0][r], _MM_PERM_CDAB));
            const __m512i s1 = _mm512_add_epi32(acc[t1][r], _mm512_shuffle_epi32(acc[t1][r], _MM_PERM_CDAB));
            const __m512i isum = _mm512_sub_epi32(_mm512_mask_blend_epi32(0xAAAA, s0, s1), comp);
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_load_ps(xst + r * xst_tile)), wsv);
            if (c == 0) {
                if (bias) v = _mm512_add_ps(v, _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(bias[t0]),
                                                                    _mm512_set1_ps(bias[t1])));
                if (yin) v = _mm512_add_ps(_mm512_loadu_ps(yin + (p * PG_RT + r) * 16), v);
            } else {
                v = _mm512_add_ps(_mm512_loadu_ps(run[p][r]), v);
            }
            _mm512_storeu_ps(run[p][r], v);
        }
    }
}

/* run[.][r] (a tile of 8 rows x PG_NT outputs) -> y: lanes 2m, 2m + 1 of run[p][r] are row m's outputs 2p, 2p + 1,
   so the 64-bit halves of run[0] and run[1] interleaved give each row's PG_NT outputs side by side */
PG_TARGET static void pg_store(const float run[PG_NT / 2][PG_RT][16], int r, int64_t m0, int64_t M, int64_t n0,
                               int64_t N, float* y) {
    if (m0 + 8 <= M && n0 + PG_NT <= N) {
        const __m512d a = _mm512_castps_pd(_mm512_loadu_ps(run[0][r])), b = _mm512_castps_pd(_mm512_loadu_ps(run[1][r]));
        const __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));  /* 128-bit lane j: row 2j */
        const __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));  /* row 2j + 1 */
        _mm_storeu_ps(y + (m0 + 0) * N + n0, _mm512_extractf32x4_ps(lo, 0));
        _mm_storeu_ps(y + (m0 + 1) * N + n0, _mm512_extractf32x4_ps(hi, 0));
        _mm_storeu_ps(y + (m0 + 2) * N + n0, _mm512_extractf32x4_ps(lo, 1));
        _mm_storeu_ps(y + (m0 + 3) * N + n0, _mm512_extractf32x4_ps(hi, 1));
        _mm_storeu_ps(y + (m0 + 4) * N + n0, _mm512_extractf32x4_ps(lo, 2));
        _mm_storeu_ps(y + (m0 + 5) * N + n0, _mm512_extractf32x4_ps(hi, 2));
        _mm_storeu_ps(y + (m0 + 6) * N + n0, _mm512_extractf32x4_ps(lo, 3));
        _mm_storeu_ps(y + (m0 + 7) * N + n0, _mm512_extractf32x4_ps(hi, 3));
        return;
    }
    for (int t = 0; t < PG_NT && n0 + t < N; t++)  /* the last rows or outputs */
        for (int m = 0; m < 8 && m0 + m < M; m++) y[(m0 + m) * N + n0 + t] = run[t / 2][r][2 * m + t % 2];
}

/* one panel (weight rows n0.. n0 + PG_NT - 1, past N: row N - 1 again, not stored) x tiles [t0, t1), PG_RT at a
   time; sums: [nc][PG_NT] scratch for the panel's code sums per chunk */
PG_TARGET static void pg_panel(const int8_t* w, int64_t N, int64_t K, int64_t C, int64_t nc, int64_t n0,
        const uint32_t* xt, const float* xst, int64_t t0, int64_t t1, int64_t M, const float* ws, int64_t ws_stride,
        const float* bias, float* y, int accumulate, const int32_t* wsum, int64_t wsum_block, int32_t* sums) {
    const int64_t tstride = K * 2, xst_tile = nc * 16;
    int64_t off[PG_NT], n[PG_NT];
    float b4[PG_NT];
    for (int t = 0; t < PG_NT; t++) {
        n[t] = n0 + t < N ? n0 + t : N - 1;
        off[t] = n[t] * K;
        b4[t] = bias ? bias[n[t]] : 0.f;
    }
    if (wsum) {  /* a chunk's sum: its blocks' (C a multiple of the block) */
        const int64_t nbw = K / wsum_block;
        for (int64_t c = 0; c < nc; c++)
            for (int t = 0; t < PG_NT; t++) {
                const int32_t* ws_row = wsum + n[t] * nbw;
                int32_t acc = 0;
                for (int64_t b = c * C / wsum_block; b < ((c + 1) * C < K ? (c + 1) * C : K) / wsum_block; b++)
                    acc += ws_row[b];
                sums[c * PG_NT + t] = acc;
            }
    } else {
        for (int64_t c = 0; c < nc; c++)
            pg_code_sums(w, off, c * C, (c + 1) * C < K ? (c + 1) * C : K, sums + c * PG_NT);
    }
    /* the rows PG_PREFETCH panels on (past N: row N - 1 again), on their way into L2 while this one multiplies */
    int64_t pfo[PG_NT];
    for (int t = 0; t < PG_NT; t++) {
        const int64_t ahead = n0 + PG_PREFETCH * PG_NT + t;
        pfo[t] = (ahead < N ? ahead : N - 1) * K;
    }
    for (int64_t tile = t0; tile < t1; tile += PG_RT) {
        const int rt = (int)(t1 - tile < PG_RT ? t1 - tile : PG_RT);
        float run[PG_NT / 2][PG_RT][16] __attribute__((aligned(64)));
        float yin[PG_NT / 2 * PG_RT * 16] __attribute__((aligned(64)));
        if (accumulate)
            for (int p = 0; p < PG_NT / 2; p++)
                for (int r = 0; r < rt; r++)
                    for (int l = 0; l < 16; l++) {
                        const int64_t m = (tile + r) * 8 + l / 2;
                        yin[(p * PG_RT + r) * 16 + l] = m < M ? y[m * N + n[2 * p + l % 2]] : 0.f;
                    }
        for (int64_t c = 0; c < nc; c++) {
            const int64_t k0 = c * C, k1 = k0 + C < K ? k0 + C : K;
            __m512i acc[PG_NT][PG_RT];
            const uint32_t* x0 = xt + tile * tstride;
            switch (rt) {
                case 1: pg_dot1(w, off, x0, tstride, k0, k1, pfo, acc); break;
                case 2: pg_dot2(w, off, x0, tstride, k0, k1, pfo, acc); break;
                case 3: pg_dot3(w, off, x0, tstride, k0, k1, pfo, acc); break;
                default: pg_dot4(w, off, x0, tstride, k0, k1, pfo, acc); break;
            }
            float sc[PG_NT];
            for (int t = 0; t < PG_NT; t++) sc[t] = ws[c * ws_stride + n[t]];
            pg_finish(acc, rt, (int)c, sums + c * PG_NT, sc, bias ? b4 : NULL, xst + (tile * nc + c) * 16, xst_tile,
                      accumulate ? yin : NULL, run);
        }
        for (int r = 0; r < rt; r++) pg_store(run, r, (tile + r) * 8, M, n0, N, y);
    }
}

/* a whole tile's codes (8 rows of xq from x0, row stride K) into xt8 ([K/8][8] qwords: k8-th group, row m = row m's
   codes 8 k8 .. 8 k8 + 7, + 128 each), 64 codes of every row at a time: the 8 x 8 qwords transposed in registers.
   Returns the groups done (K / 64 * 8; the caller moves the rest 8 bytes at a time). Why: the 8-byte moves read 8
   rows K bytes apart a qword at a time (rows the other thread had just quantized) and spent ~35 us a call there
   (perf: 3.4% of a 7 + 57-row mixed step of the 0.5B int8, 0.7% after); the same bytes. Zen 4, 0.5B int8, TTFT on
   ~1,000 tokens (bench.prefill.ours_ttft, 5 runs, builds alternating x 3): 1.70 / 1.72 / 1.72 -> 1.55 / 1.57 /
   1.56 s. */
PG_TARGET static int64_t pg_tile_codes(const int8_t* x0, int64_t K, uint64_t* xt8) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t k8 = 0;
    for (; k8 + 8 <= K / 8; k8 += 8) {
        __m512i r[8], u[8];
        for (int m = 0; m < 8; m++) r[m] = _mm512_loadu_si512((const void*)(x0 + m * K + 8 * k8));
        for (int m = 0; m < 8; m += 2) {  /* 128-bit lane i: rows m, m + 1's qwords 2i (lo) / 2i + 1 (hi) */
            u[m] = _mm512_unpacklo_epi64(r[m], r[m + 1]);
            u[m + 1] = _mm512_unpackhi_epi64(r[m], r[m + 1]);
        }
        for (int h = 0; h < 2; h++) {  /* h = 0: the even qwords (u[0], u[2], u[4], u[6]); 1: the odd */
            const __m512i a_lo = _mm512_shuffle_i64x2(u[h], u[2 + h], 0x44);
            const __m512i a_hi = _mm512_shuffle_i64x2(u[h], u[2 + h], 0xEE);
            const __m512i b_lo = _mm512_shuffle_i64x2(u[4 + h], u[6 + h], 0x44);
            const __m512i b_hi = _mm512_shuffle_i64x2(u[4 + h], u[6 + h], 0xEE);
            /* qword 2i + h of every row, rows in order: lane i of u[h], u[2 + h], u[4 + h], u[6 + h] */
            const __m512i q[4] = {_mm512_shuffle_i64x2(a_lo, b_lo, 0x88), _mm512_shuffle_i64x2(a_lo, b_lo, 0xDD),
                                  _mm512_shuffle_i64x2(a_hi, b_hi, 0x88), _mm512_shuffle_i64x2(a_hi, b_hi, 0xDD)};
            for (int i = 0; i < 4; i++)
                _mm512_store_si512((void*)(xt8 + (k8 + 2 * i + h) * 8), _mm512_xor_si512(q[i], flip));
        }
    }
    return k8;
}

/* int8 codes xq [M, K] (pf_quantize_rows'), scales xs [M, nc]; weights w [N, K] int8, ws [nc, N] (ws_stride N) or
   [N] (ws_stride 0); y [M, N]. scratch: at least pf_w8_gemm_scratch(M, K, C) bytes, 64-byte aligned.
   wsum: NULL, or the weights' code sums per block of wsum_block codes [N, K / wsum_block] (dq_w8_block_sums': the
   decode kernels keep them with int8 weights; wsum_block dividing C and K), from which each chunk's sum is added
   up, where without them every panel summed its rows' codes again (rdtsc per phase: ~4% of a 64-row gate_up call;
   a 7 + 57-row step of the 0.5B int8 -1.0 / -1.15 ms, median of 60 paired steps, twice). */
int64_t pf_w8_gemm_scratch(int64_t M, int64_t K, int64_t C) {
    const int64_t tiles = (M + 7) / 8, nc = (K + C - 1) / C;
    return tiles * K * 8 + tiles * nc * 64;
}

PG_TARGET int pf_w8_gemm(const int8_t* xq, const float* xs, int64_t M, int64_t K, int64_t C, const int8_t* w,
                         int64_t N, const float* ws, int64_t ws_stride, const float* bias, float* y, int accumulate,
                         const int32_t* wsum, int64_t wsum_block, void* scratch, int nthreads) {
    /* C <= 2^17: 128 x a chunk's weight sum (|w| <= 128) fits in int32 */
    if (K <= 0 || K % 8 || C % 8 || C <= 0 || C > (1 << 17) || M <= 0 || N <= 0 || ((uintptr_t)scratch & 63)) return -1;
    if (wsum && (wsum_block <= 0 || C % wsum_block || K % wsum_block)) return -1;
    const int64_t tiles = (M + 7) / 8, nc = (K + C - 1) / C;
    uint32_t* xt = (uint32_t*)scratch;                          /* per tile [K/8][16] dwords */
    float* xst = (float*)((char*)scratch + tiles * K * 8);      /* per tile [nc][16] */
    const int64_t tiles_per_pass = pg_tiles_per_pass(K, PG_RT);
    const int64_t panels = (N + PG_NT - 1) / PG_NT;
#pragma omp parallel num_threads(nthreads)
    {
        int32_t sums[nc * PG_NT];  /* this thread's panel: code sums per chunk (the caller's chunks: a few) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            /* dwords 2m, 2m + 1 of a tile's k8-th 16 are row m's codes 8 k8 .. 8 k8 + 7: one 8-byte move (little
               endian: the low dword is the first four codes); whole tiles 64 codes a row at a time: pg_tile_codes */
            uint64_t* xt8 = (uint64_t*)(xt + t * (K / 8) * 16);
            const int rows = M - t * 8 < 8 ? (int)(M - t * 8) : 8;
            const int64_t k8_done = rows == 8 ? pg_tile_codes(xq + t * 8 * K, K, xt8) : 0;
            for (int64_t k8 = k8_done; k8 < K / 8; k8++) {
                for (int m = 0; m < rows; m++) {
                    uint64_t v;
                    memcpy(&v, xq + (t * 8 + m) * K + 8 * k8, 8);
                    xt8[k8 * 8 + m] = v ^ 0x8080808080808080ull;
                }
                for (int m = rows; m < 8; m++) xt8[k8 * 8 + m] = 0x8080808080808080ull;  /* past M: x = 0 (not stored) */
            }
            for (int64_t c = 0; c < nc; c++)
                for (int l = 0; l < 16; l++) {
                    const int64_t m = t * 8 + l / 2;
                    xst[(t * nc + c) * 16 + l] = m < M ? xs[m * nc + c] : 0.f;
                }
        }
        for (int64_t t0 = 0; t0 < tiles; t0 += tiles_per_pass) {
            const int64_t t1 = t0 + tiles_per_pass < tiles ? t0 + tiles_per_pass : tiles;
            /* guided: each thread starts on a long run of consecutive panels (one stream through the weights, which
               its prefetches run ahead of), shorter runs at the end balance the threads. Runs of 4 panels handed out
               dynamically interleaved the threads' streams: the 0.5B's layer shapes over weights from memory, A/B,
               16 / 32 / 64 rows 29.4 / 44.3 / 75.3 -> 23.9-25.5 / 39.9-40.4 / 67.5-69.3 ms (static; guided the
               same within noise) */
#pragma omp for schedule(guided, 8)
            for (int64_t p = 0; p < panels; p++)
                pg_panel(w, N, K, C, nc, p * PG_NT, xt, xst, t0, t1, M, ws, ws_stride, bias, y, accumulate, wsum,
                         wsum_block, sums);
        }
    }
    return 0;
}

/* ---- pf_w8_gemm_avx2: the same product on AVX2 (no VNNI) -------------------------------------------------------
 * The same exact integer sums and float steps as pf_w8_gemm (the same bytes as _int_mm + pf_scale_rows), for CPUs
 * without AVX512-VNNI, where prompt rows ran on the decode kernels: those take one weight row against 4 activation
 * rows, reading every row's codes from L2 once per weight row and summing each block's lanes horizontally. Here
 * the activation rows are transposed in tiles of 8 (one 256-bit register: 8 rows x 4 consecutive codes), each
 * weight row's 4 codes one 32-bit broadcast, and |w| . sign(x, w) (vpmaddubsw: no int16 overflow, |w| <= 128 and
 * |x| <= 127) widened by vpmaddwd adds 8 rows' partial sums; PA_NT weight rows x PA_RT tiles per pass, the rows in
 * lanes, so a chunk's float step runs on 8 rows at once and no horizontal sum is left.
 * Needs K % 4 == 0 and C % 4 == 0 (the caller checks). */
#define PA_NT 4
#define PA_RT 2
typedef int32_t __attribute__((may_alias, aligned(1))) pa_i32u;

static inline __attribute__((always_inline)) void pa_dot(const int8_t* w, const int64_t* off, const int32_t* xt,
        int64_t tstride, int64_t k0, int64_t k1, const int64_t* pfo, int rt, __m256i out[PA_NT][PA_RT]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[PA_NT][PA_RT];
    for (int t = 0; t < PA_NT; t++)
        for (int r = 0; r < PA_RT; r++) acc[t][r] = _mm256_setzero_si256();
    for (int64_t k64 = k0; k64 < k1; k64 += 64) {
        for (int t = 0; t < PA_NT; t++) _mm_prefetch((const char*)(w + pfo[t] + k64), _MM_HINT_T1);
        for (int64_t k4 = k64; k4 < k1 && k4 < k64 + 64; k4 += 4) {
            __m256i xv[PA_RT];
            for (int r = 0; r < rt; r++) xv[r] = _mm256_load_si256((const __m256i*)(xt + r * tstride + k4 * 2));
            for (int t = 0; t < PA_NT; t++) {
                const __m256i wb = _mm256_set1_epi32(*(const pa_i32u*)(w + off[t] + k4));
                const __m256i wa = _mm256_sign_epi8(wb, wb);
                for (int r = 0; r < rt; r++)
                    acc[t][r] = _mm256_add_epi32(acc[t][r],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv[r], wb)), ones));
            }
        }
    }
    for (int t = 0; t < PA_NT; t++)
        for (int r = 0; r < PA_RT; r++) out[t][r] = acc[t][r];
}

/* run[0..3][r] (4 outputs x 8 rows) -> y rows m0..m0 + 7, outputs n0..n0 + 3 */
static void pa_store(const __m256 run[PA_NT][PA_RT], int r, int64_t m0, int64_t M, int64_t n0, int64_t N, float* y) {
    if (m0 + 8 <= M && n0 + PA_NT <= N) {
        const __m256 t0 = _mm256_unpacklo_ps(run[0][r], run[1][r]), t1 = _mm256_unpackhi_ps(run[0][r], run[1][r]);
        const __m256 t2 = _mm256_unpacklo_ps(run[2][r], run[3][r]), t3 = _mm256_unpackhi_ps(run[2][r], run[3][r]);
        const __m256 r0 = _mm256_shuffle_ps(t0, t2, 0x44), r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 r2 = _mm256_shuffle_ps(t1, t3, 0x44), r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        _mm_storeu_ps(y + (m0 + 0) * N + n0, _mm256_castps256_ps128(r0));
        _mm_storeu_ps(y + (m0 + 1) * N + n0, _mm256_castps256_ps128(r1));
        _mm_storeu_ps(y + (m0 + 2) * N + n0, _mm256_castps256_ps128(r2));
        _mm_storeu_ps(y + (m0 + 3) * N + n0, _mm256_castps256_ps128(r3));
        _mm_storeu_ps(y + (m0 + 4) * N + n0, _mm256_extractf128_ps(r0, 1));
        _mm_storeu_ps(y + (m0 + 5) * N + n0, _mm256_extractf128_ps(r1, 1));
        _mm_storeu_ps(y + (m0 + 6) * N + n0, _mm256_extractf128_ps(r2, 1));
        _mm_storeu_ps(y + (m0 + 7) * N + n0, _mm256_extractf128_ps(r3, 1));
        return;
    }
    float lanes[8];
    for (int t = 0; t < PA_NT && n0 + t < N; t++) {
        _mm256_storeu_ps(lanes, run[t][r]);
        for (int m = 0; m < 8 && m0 + m < M; m++) y[(m0 + m) * N + n0 + t] = lanes[m];
    }
}

/* one chunk's (or group's) v for 8 rows from row0, output n, into the running sum *run: the first takes the bias and,
   with accumulate, y's values (a residual) instead (rows past M read as 0) */
static inline __m256 pa_fold(__m256 v, int first, const __m256* run, const float* bias, int accumulate, const float* y,
                             int64_t row0, int64_t M, int64_t N, int64_t n) {
    if (!first) return _mm256_add_ps(*run, v);
    if (bias) v = _mm256_add_ps(v, _mm256_set1_ps(bias[n]));
    if (accumulate) {
        float yin[8];
        for (int m = 0; m < 8; m++) yin[m] = row0 + m < M ? y[(row0 + m) * N + n] : 0.f;
        v = _mm256_add_ps(_mm256_loadu_ps(yin), v);
    }
    return v;
}

static void pa_panel(const int8_t* w, int64_t N, int64_t K, int64_t C, int64_t nc, int64_t n0, const int32_t* xt,
        const float* xst, int64_t t0, int64_t t1, int64_t M, const float* ws, int64_t ws_stride, const float* bias,
        float* y, int accumulate) {
    const int64_t tstride = K * 2;
    int64_t off[PA_NT], n[PA_NT], pfo[PA_NT];
    for (int t = 0; t < PA_NT; t++) {
        n[t] = n0 + t < N ? n0 + t : N - 1;
        off[t] = n[t] * K;
        const int64_t ahead = n0 + PG_PREFETCH * PA_NT + t;
        pfo[t] = (ahead < N ? ahead : N - 1) * K;
    }
    for (int64_t tile = t0; tile < t1; tile += PA_RT) {
        const int rt = (int)(t1 - tile < PA_RT ? t1 - tile : PA_RT);
        __m256 run[PA_NT][PA_RT];
        for (int64_t c = 0; c < nc; c++) {
            const int64_t k0 = c * C, k1 = k0 + C < K ? k0 + C : K;
            __m256i acc[PA_NT][PA_RT];
            const int32_t* x0 = xt + tile * tstride;
            if (rt == PA_RT) pa_dot(w, off, x0, tstride, k0, k1, pfo, PA_RT, acc);
            else pa_dot(w, off, x0, tstride, k0, k1, pfo, 1, acc);
            for (int t = 0; t < PA_NT; t++) {
                const __m256 wsv = _mm256_set1_ps(ws[c * ws_stride + n[t]]);
                for (int r = 0; r < rt; r++) {
                    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[t][r]),
                                                           _mm256_load_ps(xst + ((tile + r) * nc + c) * 8)), wsv);
                    run[t][r] = pa_fold(v, c == 0, &run[t][r], bias, accumulate, y, (tile + r) * 8, M, N, n[t]);
                }
            }
        }
        for (int r = 0; r < rt; r++) pa_store(run, r, (tile + r) * 8, M, n0, N, y);
    }
}

/* activation tile t (rows 8t.. of xq [M, K], past M zeros) -> xtt [K/4][8] dwords: 4 codes of each row a lane; returns
   its rows */
static int pa_transpose_tile(const int8_t* xq, int64_t M, int64_t K, int64_t t, int32_t* xtt) {
    const int rows = M - t * 8 < 8 ? (int)(M - t * 8) : 8;
    for (int64_t k4 = 0; k4 < K / 4; k4++) {
        for (int m = 0; m < rows; m++) memcpy(xtt + k4 * 8 + m, xq + (t * 8 + m) * K + 4 * k4, 4);
        for (int m = rows; m < 8; m++) xtt[k4 * 8 + m] = 0;
    }
    return rows;
}

/* pf_w8_gemm's arguments (wsum unused: no unsigned offset to take off); scratch as pf_w8_gemm_scratch */
int pf_w8_gemm_avx2(const int8_t* xq, const float* xs, int64_t M, int64_t K, int64_t C, const int8_t* w, int64_t N,
                    const float* ws, int64_t ws_stride, const float* bias, float* y, int accumulate, void* scratch,
                    int nthreads) {
    /* C <= 2^17: a chunk's sum (|w| <= 128, |x| <= 127) fits in int32 */
    if (K <= 0 || K % 4 || C % 4 || C <= 0 || C > (1 << 17) || M <= 0 || N <= 0 || ((uintptr_t)scratch & 63))
        return -1;
    const int64_t tiles = (M + 7) / 8, nc = (K + C - 1) / C;
    int32_t* xt = (int32_t*)scratch;                            /* per tile [K/4][8] dwords */
    float* xst = (float*)((char*)scratch + tiles * K * 8);      /* per tile [nc][8] */
    const int64_t tiles_per_pass = pg_tiles_per_pass(K, PA_RT);
    const int64_t panels = (N + PA_NT - 1) / PA_NT;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int rows = pa_transpose_tile(xq, M, K, t, xt + t * (K / 4) * 8);
            for (int64_t c = 0; c < nc; c++)
                for (int m = 0; m < 8; m++) xst[(t * nc + c) * 8 + m] = m < rows ? xs[(t * 8 + m) * nc + c] : 0.f;
        }
        for (int64_t t0 = 0; t0 < tiles; t0 += tiles_per_pass) {
            const int64_t t1 = t0 + tiles_per_pass < tiles ? t0 + tiles_per_pass : tiles;
#pragma omp for schedule(guided, 8)
            for (int64_t p = 0; p < panels; p++)
                pa_panel(w, N, K, C, nc, p * PA_NT, xt, xst, t0, t1, M, ws, ws_stride, bias, y, accumulate);
        }
    }
    return 0;
}

/* ---- pf_w4_gemm_avx2: int4 weights' codes, as stored, on AVX2 -------------------------------------------------
 * On AVX2 alone int4 weights requantized to int8 (pf_w4_to_i8) cost pf_w8_gemm_avx2's two multiplies per 32 products
 * (vpmaddubsw, then vpmaddwd to widen), no faster than the decode kernels. Here the codes stay 0..15 (unsigned:
 * no vpsignb), and a vpmaddubsw pair sum is at most 2 x 15 x 127 = 3810, so 8 of them (32 values) add up in int16
 * before one vpmaddwd widens them: ~1.1 multiplies per 32 products. The activations take the decode kernels'
 * quantization (one scale per row and group of G values, pf_quantize_rows with C = G: the same codes and scales),
 * so each group's integer sum is the one the decode kernels form; only the float steps' order differs:
 *   y[m, n] = sum_g xs[m, g] (s[n, g] * isum[m, n, g] + (z[n, g] - 8 s[n, g]) * qsum[m, g]) (+ bias) (+ y).
 * Layout as pf_w8_gemm_avx2: activation rows transposed in tiles of 8 (one register: 8 rows x 4 codes), each
 * weight row's 4 codes one 32-bit broadcast, PA_NT weight rows x PA_RT tiles per register pass; a panel's PA_NT
 * weight rows are unpacked to one code a byte first (once per pass over the tiles, into the calling thread's part of
 * the scratch). Needs G % 32 == 0, K % G == 0, K % 64 == 0 (the int4 layout's blocks); the caller checks. */
int64_t pf_w4_gemm_scratch(int64_t M, int64_t K, int64_t G, int nthreads) {
    const int64_t tiles = (M + 7) / 8, ng = G > 0 ? K / G : 0;
    /* transposed codes, then per tile and group 8 row scales and 8 code sums (scaled), then each thread's codes */
    return tiles * K * 8 + tiles * ng * 64 + (int64_t)(nthreads > 0 ? nthreads : 1) * PA_NT * K;
}

/* the int32 sums of group [k0, k0 + G) for PA_NT unpacked weight rows (cw[t]) x rt tiles (tile r at xt + r * tstride
   dwords): int16 sums of 32 values at a time, widened */
static inline __attribute__((always_inline)) void pw_group(const uint8_t* const cw[PA_NT], const int32_t* xt,
        int64_t tstride, int64_t k0, int64_t G, int rt, __m256i out[PA_NT][PA_RT]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[PA_NT][PA_RT];
    for (int t = 0; t < PA_NT; t++)
        for (int r = 0; r < PA_RT; r++) acc[t][r] = _mm256_setzero_si256();
    for (int64_t kb = k0; kb < k0 + G; kb += 32) {
        __m256i a16[PA_NT][PA_RT];
        for (int t = 0; t < PA_NT; t++)
            for (int r = 0; r < PA_RT; r++) a16[t][r] = _mm256_setzero_si256();
        /* unrolled twice, not 8 times: fully unrolled, GCC formed all the products first and spilled them */
#pragma GCC unroll 2
        for (int64_t k4 = kb; k4 < kb + 32; k4 += 4) {
            __m256i xv[PA_RT];
            for (int r = 0; r < rt; r++) xv[r] = _mm256_load_si256((const __m256i*)(xt + r * tstride + k4 * 2));
            for (int t = 0; t < PA_NT; t++) {
                const __m256i wb = _mm256_set1_epi32(*(const pa_i32u*)(cw[t] + k4));
                for (int r = 0; r < rt; r++) a16[t][r] = _mm256_add_epi16(a16[t][r], _mm256_maddubs_epi16(wb, xv[r]));
            }
        }
        for (int t = 0; t < PA_NT; t++)
            for (int r = 0; r < rt; r++) acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(a16[t][r], ones));
    }
    for (int t = 0; t < PA_NT; t++)
        for (int r = 0; r < PA_RT; r++) out[t][r] = acc[t][r];
}

static void pw_panel(const uint8_t* w, const uint16_t* s, const uint16_t* z, int64_t N, int64_t K, int64_t G,
        int64_t n0, const int32_t* xt, const float* xst, const float* dxt, int64_t t0, int64_t t1, int64_t M,
        const float* bias, float* y, int accumulate, uint8_t* cw) {
    const int64_t ng = K / G, tstride = K * 2;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    int64_t n[PA_NT];
    const uint8_t* cwp[PA_NT];
    for (int t = 0; t < PA_NT; t++) {  /* the panel's rows to one code a byte; the rows PG_PREFETCH panels on to L2 */
        n[t] = n0 + t < N ? n0 + t : N - 1;
        const uint8_t* wr = w + n[t] * (K / 2);
        const int64_t ahead = n0 + PG_PREFETCH * PA_NT + t;
        const uint8_t* pf = w + (ahead < N ? ahead : N - 1) * (K / 2);
        uint8_t* c = cw + t * K;
        for (int64_t k = 0; k < K; k += 64) {  /* byte j of a 64-value block: value j | value j + 32 << 4 */
            _mm_prefetch((const char*)(pf + k / 2), _MM_HINT_T1);
            const __m256i b = _mm256_loadu_si256((const __m256i*)(wr + k / 2));
            _mm256_storeu_si256((__m256i*)(c + k), _mm256_and_si256(b, low4));
            _mm256_storeu_si256((__m256i*)(c + k + 32), _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
        }
        cwp[t] = c;
    }
    for (int64_t tile = t0; tile < t1; tile += PA_RT) {
        const int rt = (int)(t1 - tile < PA_RT ? t1 - tile : PA_RT);
        const int32_t* x0 = xt + tile * tstride;
        __m256 run[PA_NT][PA_RT];
        for (int64_t g = 0; g < ng; g++) {
            __m256i acc[PA_NT][PA_RT];
            if (rt == PA_RT) pw_group(cwp, x0, tstride, g * G, G, PA_RT, acc);
            else pw_group(cwp, x0, tstride, g * G, G, 1, acc);
            for (int t = 0; t < PA_NT; t++) {
                const float sg = bf16_to_f32(s[n[t] * ng + g]);
                const __m256 sv = _mm256_set1_ps(sg);
                const __m256 cz = _mm256_set1_ps(bf16_to_f32(z[n[t] * ng + g]) - 8.f * sg);  /* the zero-point term */
                for (int r = 0; r < rt; r++) {
                    const int64_t o = ((tile + r) * ng + g) * 8;
                    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[t][r]),
                                                           _mm256_mul_ps(_mm256_load_ps(xst + o), sv)),
                                             _mm256_mul_ps(_mm256_load_ps(dxt + o), cz));
                    run[t][r] = pa_fold(v, g == 0, &run[t][r], bias, accumulate, y, (tile + r) * 8, M, N, n[t]);
                }
            }
        }
        for (int r = 0; r < rt; r++) pa_store(run, r, (tile + r) * 8, M, n0, N, y);
    }
}

/* xq [M, K] int8, xs [M, K / G] (pf_quantize_rows with C = G); w [N, K / 2] uint8, s, z [N, K / G] bfloat16 (the
   int4 layout); y [M, N] (+)= the product (+ bias). scratch: at least pf_w4_gemm_scratch(M, K, G, nthreads) bytes,
   64-byte aligned. */
int pf_w4_gemm_avx2(const int8_t* xq, const float* xs, int64_t M, int64_t K, int64_t G, const uint8_t* w,
                    const uint16_t* s, const uint16_t* z, int64_t N, const float* bias, float* y, int accumulate,
                    void* scratch, int nthreads) {
    if (K <= 0 || G <= 0 || G % 32 || K % G || K % 64 || M <= 0 || N <= 0 || nthreads <= 0 ||
        ((uintptr_t)scratch & 63))
        return -1;
    const int64_t tiles = (M + 7) / 8, ng = K / G;
    int32_t* xt = (int32_t*)scratch;                          /* per tile [K/4][8] dwords */
    float* xst = (float*)((char*)scratch + tiles * K * 8);    /* per tile [ng][8]: the rows' group scales */
    float* dxt = xst + tiles * ng * 8;                        /* per tile [ng][8]: scale x the group's code sum */
    uint8_t* cw_all = (uint8_t*)(dxt + tiles * ng * 8);       /* per thread PA_NT x K codes */
    const int64_t tiles_per_pass = pg_tiles_per_pass(K, PA_RT);
    const int64_t panels = (N + PA_NT - 1) / PA_NT;
#pragma omp parallel num_threads(nthreads)
    {
        uint8_t* cw = cw_all + (int64_t)omp_get_thread_num() * PA_NT * K;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int rows = pa_transpose_tile(xq, M, K, t, xt + t * (K / 4) * 8);
            for (int64_t g = 0; g < ng; g++)
                for (int m = 0; m < 8; m++) {
                    float d = 0.f, dsum = 0.f;
                    if (m < rows) {
                        const int8_t* q = xq + (t * 8 + m) * K + g * G;
                        int32_t sum = 0;
                        for (int64_t k = 0; k < G; k++) sum += q[k];
                        d = xs[(t * 8 + m) * ng + g];
                        dsum = d * (float)sum;
                    }
                    xst[(t * ng + g) * 8 + m] = d;
                    dxt[(t * ng + g) * 8 + m] = dsum;
                }
        }
        for (int64_t t0 = 0; t0 < tiles; t0 += tiles_per_pass) {
            const int64_t t1 = t0 + tiles_per_pass < tiles ? t0 + tiles_per_pass : tiles;
#pragma omp for schedule(guided, 8)
            for (int64_t p = 0; p < panels; p++)
                pw_panel(w, s, z, N, K, G, p * PA_NT, xt, xst, dxt, t0, t1, M, bias, y, accumulate, cw);
        }
    }
    return 0;
}
