/*
 * Weight-only int8 / int4 linear layers for x86-64 CPUs with AVX2 (no AVX-512 or AMX needed; the
 * linear kernels also come compiled for AVX-VNNI, and as 512-bit kernels for AVX-512 VNNI, and run on
 * the best the CPU has, chosen at run time: dq_set_isa).
 *
 * Why: PyTorch's packed weight-only kernels (aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu)
 * convert every weight to float and multiply with FMAs; on a 2-core AVX2 machine that is
 * compute-bound well below memory bandwidth. Here the activations are quantized to int8 (one scale
 * per block of B values, like llama.cpp's Q8 activations) and the dot products run on 8-bit integer
 * instructions (maddubs: 32 multiply-adds per instruction), so a decode step reads the weights at
 * close to memory speed and a batch of M rows reuses each weight row from L1.
 *
 * Layouts (prepared once at load time by model_runtime/ckernels.py):
 *   int8: w [N, K] int8 (symmetric, |code| <= 127), ws [N] float32 per-row scale.
 *   int4: w [N, K/2] uint8; for each block of 64 values, 32 bytes: byte j = value j (low nibble)
 *         | value j+32 (high nibble); codes 0..15, value = (code - 8) * s + z per group of G values;
 *         s, z [N, K/G] bfloat16 (as stored: half the bytes of float32, widened in registers).
 * Activations x [M, K] float32; y [M, N] float32 (+ bias [N] when given).
 * Activation blocks: B = G for int4 (so one scale pairs with one weight group), B = 32..128 for int8.
 */
#ifndef DQ_KERNELS_DEFINED
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_norm.h"  /* hsum_ps, rms_norm_row (a row's RMSNorm before quantization; shared with prefill_kernels.c) */

#define DQ_ABI_VERSION 9

int dq_abi_version(void) { return DQ_ABI_VERSION; }


static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* The int8 kernels' float step, the same on every instruction set and for every batch size (so a row's result
   never depends on the kernel or on the rows beside it): per activation block b, the exact integer dot product
   isum_b of the block, then acc = fma(float(isum_b), xs_b, acc), blocks in order from acc = 0; the weight row's
   scale (and bias) after. One rounding per block: the 8-row kernel (w8q_panel) runs it on 16 lanes at once. */
#define W8_BLOCK_STEP(isum, xs, acc) fmaf((float)(isum), (xs), (acc))

/* A kernel's output for weight row n: v plus the row's bias, stored or added to *o (a residual) */
static inline void out_store(float* o, float v, const float* bias, int64_t n, int accumulate) {
    if (bias) v += bias[n];
    *o = accumulate ? *o + v : v;
}

/* An int8 kernel's output for weight row n: r times the row's scale, then as out_store */
static inline void w8_out(float* o, float r, const float* ws, const float* bias, int64_t n, int accumulate) {
    out_store(o, r * ws[n], bias, n, accumulate);
}

/* An int4 kernel's prefetch of group g's bytes [g0, g0 + gb) of a later weight row pf: the 64-byte lines that
   start inside the group (a group of 32 or 64 values shares its line with the next ones) */
static inline void w4_prefetch_group(const uint8_t* pf, uint64_t g0, uint64_t gb) {
    for (uint64_t o = (g0 + 63) & ~(uint64_t)63; o < g0 + gb; o += 64) _mm_prefetch((const char*)(pf + o), _MM_HINT_T0);
}

/* An int4 kernel's prefetch of len group scales and zeros from element `from` on (a few later weight rows'): every
   cache line they touch, the last one included (only the first line of a 4864-wide row's 76 B left the rest to demand
   misses: the 0.5B's down projection at one row +5-10% GB/s with all of them, three A/B runs) */
static inline void w4_prefetch_params(const uint16_t* s, const uint16_t* z, int64_t from, int64_t len) {
    for (int64_t o = from; o < from + len; o += 32) {
        _mm_prefetch((const char*)(s + o), _MM_HINT_T0);
        _mm_prefetch((const char*)(z + o), _MM_HINT_T0);
    }
    _mm_prefetch((const char*)(s + from + len - 1), _MM_HINT_T0);
    _mm_prefetch((const char*)(z + from + len - 1), _MM_HINT_T0);
}

/* One row: x [K] -> q [K] int8 with one scale (amax / 127) per block of B values, and the code sum
   of each block. Rounds to nearest-even (cvtps), like lrintf; B % 32 == 0. */
static void quantize_row(const float* x, int64_t K, int64_t B, int8_t* q, float* scale, int32_t* qsum) {
    const __m256 sign_mask = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / B; b++) {
        const float* xb = x + b * B;
        __m256 mx = _mm256_setzero_ps();
        for (int64_t i = 0; i < B; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign_mask, _mm256_loadu_ps(xb + i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.f;
        const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
        __m256i sum = _mm256_setzero_si256();
        for (int64_t i = 0; i < B; i += 32) {
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), id));
            const __m256i bb = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), id));
            const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), id));
            const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), id));
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(a, bb), _mm256_add_epi32(c, e)));
            /* |x * id| <= 127 (x within the block's amax), so the saturating packs never clip */
            const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, bb), _mm256_packs_epi32(c, e));
            _mm256_storeu_si256((__m256i*)(q + b * B + i), _mm256_permutevar8x32_epi32(packed, order));
        }
        scale[b] = d;
        qsum[b] = hsum_epi32(sum);
    }
}

/* x [M, K] float32 (RMSNorm'd first when norm_w) -> q [M, K] int8, scale [M, K/B],
   qsum [M, K/B] (sum of the codes of each block). tmp: M x K floats of scratch. Rows in parallel
   (a prefill chunk has tens of them). */
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t B, const float* norm_w, float eps,
                          float* tmp, int8_t* q, float* scale, int32_t* qsum, int nthreads) {
    const int64_t nb = K / B;
#pragma omp parallel for schedule(static) num_threads(M >= 4 ? nthreads : 1)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        if (norm_w) {
            rms_norm_row(xr, K, norm_w, eps, tmp + m * K);
            xr = tmp + m * K;
        }
        quantize_row(xr, K, B, q + m * K, scale + m * nb, qsum + m * nb);
    }
}

/* scratch: the int8 codes, then (4-byte aligned) block scales, code sums and one float row */
typedef struct { int8_t* buf; int8_t* q; float* scale; int32_t* qsum; float* tmp; } scratch_t;

static int scratch_init(scratch_t* s, int64_t M, int64_t K, int64_t nb) {
    const int64_t qbytes = (M * K + 63) & ~(int64_t)63;
    void* p = NULL;
    if (posix_memalign(&p, 64, (size_t)(qbytes + 8 * M * nb + 4 * M * K + 64)) != 0) return -1;
    s->buf = (int8_t*)p;
    s->q = s->buf;
    s->scale = (float*)(s->buf + qbytes);
    s->qsum = (int32_t*)(s->scale + M * nb);
    s->tmp = (float*)(s->qsum + M * nb);
    return 0;
}

/* Streaming the weights: threads take long contiguous ranges of rows (schedule(guided): half the rows
   split between them first, then shrinking chunks, so a thread the server's event loop preempts on a
   2-core machine is not waited for as with equal static shares), the hardware prefetcher sees long
   streams, and each thread software-prefetches the row ~PF_BYTES ahead while it multiplies this one.
   Without that, a single-row decode step waited on memory and then computed, one after the other
   (measured: 1.3-2x slower per layer, 32-row dynamic chunks as well). */
#ifndef PF_BYTES
#define PF_BYTES 4096
#endif
/* The AVX-512 one-row kernels (int8 and int4, a single-stream decode step) prefetch further: on the Zen 4 VM, the
   0.5B int8's linears + head at one row, alternating per round (medians of 15-25 rounds): 4096 -> 8192 bytes 17.93 ->
   16.92, 16.58 -> 14.52, 16.43 -> 16.17, 17.23 -> 14.87, 16.94 -> 16.78, 21.09 -> 19.67 ms (6144: 15.22, 12288:
   15.06, 2048: 19.07); int4's linears 7.50 -> 6.99, 10.39 -> 10.06 ms; 2 and 3 rows no better (15.64 vs 15.76, 19.17
   vs 19.45): they keep PF_BYTES. The gain is most in the down projection, whose 4,864-byte rows PF_BYTES put one row
   ahead. */
#ifndef PF_BYTES_ONE_ROW
#define PF_BYTES_ONE_ROW 8192
#endif
static inline int64_t prefetch_rows_at(int64_t row_bytes, int64_t distance) {
    if (row_bytes <= 0) return 1;
    const int64_t r = (distance + row_bytes - 1) / row_bytes;
    return r < 1 ? 1 : r;
}
static inline int64_t prefetch_rows(int64_t row_bytes) { return prefetch_rows_at(row_bytes, PF_BYTES); }

/* int8 weights [N, K] -> out [N, K/B]: each block's weight sum (exact; what the AVX-512 batch kernel subtracts,
   times 128, for its unsigned activation codes). Prepared once with the weights (ckernels.w8_block_sums). */
void dq_w8_block_sums(const int8_t* w, int64_t N, int64_t K, int64_t B, int32_t* out, int nthreads) {
    const int64_t nb = K / B;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) {
            int32_t s = 0;
            for (int64_t i = b * B; i < (b + 1) * B; i++) s += w[n * K + i];
            out[n * nb + b] = s;
        }
}

#define DQ_KERNELS_DEFINED 1

/* The linear kernels, once per instruction set: this file includes itself (the body after the #else at
   the end) once plainly and once under an avxvnni target region. */
#define SFX(name) name##_avx2
#define DQ_VNNI 0
#include "dq_kernels.c"
#undef SFX
#undef DQ_VNNI

/* GCC >= 11 knows AVX-VNNI; clang ignores `#pragma GCC target`, so it builds the AVX2 kernels only */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define DQ_HAVE_AVXVNNI 1
#pragma GCC push_options
#pragma GCC target("avxvnni")
#define SFX(name) name##_avxvnni
#define DQ_VNNI 1
#include "dq_kernels.c"
#undef SFX
#undef DQ_VNNI
#pragma GCC pop_options
#else
#define DQ_HAVE_AVXVNNI 0
#endif

/* AVX-512 (F/BW/VL/DQ + VNNI): 512-bit kernels for the shapes real models have (K a multiple of 128;
   int8 activation blocks of 64/128; int4 groups of 32, 64 or multiples of 128), the 256-bit kernels
   above, EVEX-encoded (AVX512-VNNI CPUs may lack AVX-VNNI), for the rest. Same results as AVX2, bit for
   bit: int8 takes each block's exact integer sum into the one float step (W8_BLOCK_STEP); int4 folds each
   512-bit int32 accumulator (lane l + lane l+8) into exactly the 8 integer lanes the 256-bit kernels have,
   before the same float steps in the same order. GCC >= 9 (the target names). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#define DQ_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define SFX(name) name##_avx512y
#define DQ_VNNI 2
#include "dq_kernels.c"
#undef SFX
#undef DQ_VNNI

/* the 256-bit kernels' 8 int32 lanes: 32-byte chunk lane l of either half */
static inline __m256i fold512(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* int8 on AVX-512, blocks B % 64 == 0. vpdpbusd multiplies unsigned by signed bytes and AVX-512 has no vpsignb
   (the 256-bit kernels' |w| . sign(x, w) trick), so the activations come as unsigned codes x + 128 (xu) and each
   block subtracts 128 * sum(w): the same exact integer dot products. */

/* W8Q_MIN_ROWS+ activation rows (a batched decode step; a prompt chunk when no prompt GEMM is chosen): W8Q_NT weight rows per
   pass (a panel) against 8 activation rows at a time, the activation rows transposed (xt) so that one 512-bit
   register holds 8 rows x 8 consecutive codes (lane 2m + h: row m, codes 4h..4h+3 of the 8) and each weight row's
   8 codes are one 64-bit broadcast: one vpdpbusd adds 8 rows' partial dot products, and a block's float step
   (W8_BLOCK_STEP) runs for the 8 rows of an output in one instruction, where the per-row kernels paid a
   horizontal sum per row and output. The block's weight sums come prepared with the weights (dq_w8_block_sums).
   The next panels are prefetched into L2, not L1 (measured: the 0.5B's head at 8 rows 8.8 -> 4.1 ms; into L1
   the eight row streams evicted the activations). */
#define W8Q_NT 8
#define W8Q_AHEAD 2
typedef int64_t __attribute__((may_alias, aligned(1))) i64_unaligned;
static inline __attribute__((always_inline)) void w8q_panel(const int8_t* wr, const int64_t* off, const uint32_t* xt,
        const float* xst, const int32_t* const* wsum, int64_t B, int64_t nb, const int8_t* pf, float* out) {
    __m512 facc[W8Q_NT];
    for (int t = 0; t < W8Q_NT; t++) facc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i acc[W8Q_NT];
        for (int t = 0; t < W8Q_NT; t++) acc[t] = _mm512_setzero_si512();
        for (int64_t k = b * B; k < (b + 1) * B; k += 64) {
            for (int t = 0; t < W8Q_NT; t++) _mm_prefetch((const char*)(pf + off[t] + k), _MM_HINT_T1);
            for (int64_t k8 = k; k8 < k + 64; k8 += 8) {
                const __m512i xv = _mm512_load_si512((const void*)(xt + k8 * 2));
                for (int t = 0; t < W8Q_NT; t++)
                    acc[t] = _mm512_dpbusd_epi32(acc[t], xv, _mm512_set1_epi64(*(const i64_unaligned*)(wr + off[t] + k8)));
            }
        }
        const __m512 xsv = _mm512_load_ps(xst + b * 16);
        for (int t = 0; t < W8Q_NT; t++) {
            /* lanes 2m and 2m + 1 both hold row m's block sum, less 128 * the weight sum: exact */
            const __m512i isum = _mm512_add_epi32(acc[t], _mm512_shuffle_epi32(acc[t], _MM_PERM_CDAB));
            const __m512i d = _mm512_sub_epi32(isum, _mm512_set1_epi32(wsum[t][b] * 128));
            facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), xsv, facc[t]);
        }
    }
    for (int t = 0; t < W8Q_NT; t++) _mm512_storeu_ps(out + t * 16, facc[t]);
}

static inline __attribute__((always_inline)) void w8q_store_rows(float* y0, int64_t N, __m128 r0, __m128 r1,
                                                                  int64_t rows, int accumulate) {
    /* rows y0 and y0 + N, those of them below `rows` (a tile's rows past M are not stored) */
    if (rows > 0) _mm_storeu_ps(y0, accumulate ? _mm_add_ps(_mm_loadu_ps(y0), r0) : r0);
    if (rows > 1) _mm_storeu_ps(y0 + N, accumulate ? _mm_add_ps(_mm_loadu_ps(y0 + N), r1) : r1);
}

/* A tile's outputs for 4 * groups weight rows: out[t] (lanes 2m, 2m + 1: row m's sum for output n0 + t) -> y
   rows 0..mt - 1, outputs n0..n0 + 4 groups - 1, w8_out's float steps on vectors (the same bytes): 4 outputs at a time,
   output pairs blended into one register (lane 2m: the pair's first, 2m + 1: its second), scaled, their 64-bit
   halves interleaved so that each 128-bit lane holds one row's 4 outputs. Value by value (w8_out), the stores and
   their loop bookkeeping were ~30% of a hot 8-row call (perf annotate, 1024 x 896); A/B: that call ~43 -> ~37 us,
   the 0.5B's linears (cold) at 8 rows 24.35 -> 22.75 ms, at 16 rows 36.95 -> 32.41. */
static inline __attribute__((always_inline)) void w8q_store(const float* out, int groups, const float* ws,
        const float* bias, int64_t n0, float* y, int64_t N, int64_t mt, int accumulate) {
    for (int q = 0; q < groups; q++) {
        const int64_t n = n0 + 4 * q;
        __m512 h[2];
        for (int p = 0; p < 2; p++) {  /* outputs n + 2p, n + 2p + 1 */
            const int64_t na = n + 2 * p, nb = na + 1;
            __m512 v = _mm512_mask_blend_ps(0xAAAA, _mm512_load_ps(out + (na - n0) * 16),
                                            _mm512_load_ps(out + (nb - n0) * 16));
            v = _mm512_mul_ps(v, _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(ws[na]), _mm512_set1_ps(ws[nb])));
            if (bias)
                v = _mm512_add_ps(v, _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(bias[na]), _mm512_set1_ps(bias[nb])));
            h[p] = v;
        }
        const __m512d a = _mm512_castps_pd(h[0]), b = _mm512_castps_pd(h[1]);
        const __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));  /* 128-bit lane i: row 2i's 4 outputs */
        const __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));  /* row 2i + 1's */
        w8q_store_rows(y + n, N, _mm512_extractf32x4_ps(lo, 0), _mm512_extractf32x4_ps(hi, 0), mt - 0,
                       accumulate);
        w8q_store_rows(y + 2 * N + n, N, _mm512_extractf32x4_ps(lo, 1), _mm512_extractf32x4_ps(hi, 1), mt - 2,
                       accumulate);
        w8q_store_rows(y + 4 * N + n, N, _mm512_extractf32x4_ps(lo, 2), _mm512_extractf32x4_ps(hi, 2), mt - 4,
                       accumulate);
        w8q_store_rows(y + 6 * N + n, N, _mm512_extractf32x4_ps(lo, 3), _mm512_extractf32x4_ps(hi, 3), mt - 6,
                       accumulate);
    }
}

/* Past 8 rows: W8Q_NT2 full weight rows (row n at w0 + n K) against two tiles of 8 activation rows, each weight
   broadcast feeding both (the four 0.5B layer shapes at 64 rows 4.70 -> 3.43 ms, at 256 rows 17.5 -> 14.1; the
   same sums and float steps as w8q_panel, so the same bytes). out: [2][W8Q_NT2][16]. */
#define W8Q_NT2 4
static inline __attribute__((always_inline)) void w8q2_panel(const int8_t* w0, int64_t K, const uint32_t* xt0,
        const uint32_t* xt1, const float* xs0, const float* xs1, const int32_t* wsum0, int64_t B, int64_t nb,
        const int8_t* pf, float* out) {
    __m512 f0[W8Q_NT2], f1[W8Q_NT2];
    for (int t = 0; t < W8Q_NT2; t++) {
        f0[t] = _mm512_setzero_ps();
        f1[t] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        __m512i a0[W8Q_NT2], a1[W8Q_NT2];
        for (int t = 0; t < W8Q_NT2; t++) {
            a0[t] = _mm512_setzero_si512();
            a1[t] = _mm512_setzero_si512();
        }
        for (int64_t k = b * B; k < (b + 1) * B; k += 64) {
            for (int t = 0; t < W8Q_NT2; t++) _mm_prefetch((const char*)(pf + t * K + k), _MM_HINT_T1);
            for (int64_t k8 = k; k8 < k + 64; k8 += 8) {
                const __m512i x0 = _mm512_load_si512((const void*)(xt0 + k8 * 2));
                const __m512i x1 = _mm512_load_si512((const void*)(xt1 + k8 * 2));
                for (int t = 0; t < W8Q_NT2; t++) {
                    const __m512i wv = _mm512_set1_epi64(*(const i64_unaligned*)(w0 + t * K + k8));
                    a0[t] = _mm512_dpbusd_epi32(a0[t], x0, wv);
                    a1[t] = _mm512_dpbusd_epi32(a1[t], x1, wv);
                }
            }
        }
        const __m512 s0 = _mm512_load_ps(xs0 + b * 16), s1 = _mm512_load_ps(xs1 + b * 16);
        for (int t = 0; t < W8Q_NT2; t++) {
            const __m512i c = _mm512_set1_epi32(wsum0[t * nb + b] * 128);
            const __m512i i0 = _mm512_add_epi32(a0[t], _mm512_shuffle_epi32(a0[t], _MM_PERM_CDAB));
            const __m512i i1 = _mm512_add_epi32(a1[t], _mm512_shuffle_epi32(a1[t], _MM_PERM_CDAB));
            f0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i0, c)), s0, f0[t]);
            f1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i1, c)), s1, f1[t]);
        }
    }
    for (int t = 0; t < W8Q_NT2; t++) {
        _mm512_storeu_ps(out + t * 16, f0[t]);
        _mm512_storeu_ps(out + (W8Q_NT2 + t) * 16, f1[t]);
    }
}

/* int8, 2..W8Q_MIN_ROWS - 1 activation rows (mt): one weight row per pass, its 64-byte vectors shared by the rows;
   fewer rows than the 8 lanes of w8q_panel, whose cost does not shrink with them (0.5B int8 decode step, alternating
   A/B: 2 rows 18.6 ms here vs 19.5 there, 3 rows 21.5 vs 22.4; 4 rows, separate runs: 20.4-21.0 vs 19.9-20.1) */
#define W8Q_MIN_ROWS 4
static inline __attribute__((always_inline)) void w8z_tile(const int8_t* wr, const uint8_t* xu, const float* xs,
        const int32_t* wsr, int64_t K, int64_t B, int64_t nb, int mt, float* r, const int8_t* pf) {
    float acc[W8Q_MIN_ROWS - 1] = {0.f};
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t o = b * B; o < (b + 1) * B; o += 64) _mm_prefetch((const char*)(pf + o), _MM_HINT_T0);
        __m512i ai[W8Q_MIN_ROWS - 1];
        for (int j = 0; j < mt; j++) ai[j] = _mm512_setzero_si512();
        for (int64_t i = b * B; i < (b + 1) * B; i += 64) {
            const __m512i wv = _mm512_loadu_si512((const void*)(wr + i));
            for (int j = 0; j < mt; j++)
                ai[j] = _mm512_dpbusd_epi32(ai[j], _mm512_loadu_si512((const void*)(xu + j * K + i)), wv);
        }
        for (int j = 0; j < mt; j++)
            acc[j] = W8_BLOCK_STEP(hsum_epi32(fold512(ai[j])) - wsr[b] * 128, xs[j * nb + b], acc[j]);
    }
    for (int j = 0; j < mt; j++) r[j] = acc[j];
}

/* int8, one activation row, two weight rows at a time sharing the activation loads; the x + 128 correction reads
   the rows' block sums (ws0/ws1, as every batch kernel), so a 64-byte weight vector costs one load and one vpdpbusd.
   Weights prefetched into L2: into L1, two weight streams and the activations competed for it (the int4 one-row
   kernel's lesson, session 10). */
static inline __attribute__((always_inline)) void w8z_rows2(const int8_t* w0, const int8_t* w1, const uint8_t* xu,
        const float* xs, const int32_t* ws0, const int32_t* ws1, int64_t B, int64_t nb, const int8_t* pf, float* r) {
    float acc0 = 0.f, acc1 = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        for (int64_t i = b * B; i < (b + 1) * B; i += 64) {
            _mm_prefetch((const char*)(pf + i), _MM_HINT_T1);
            _mm_prefetch((const char*)(pf + (w1 - w0) + i), _MM_HINT_T1);
            const __m512i x = _mm512_loadu_si512((const void*)(xu + i));
            a0 = _mm512_dpbusd_epi32(a0, x, _mm512_loadu_si512((const void*)(w0 + i)));
            a1 = _mm512_dpbusd_epi32(a1, x, _mm512_loadu_si512((const void*)(w1 + i)));
        }
        acc0 = W8_BLOCK_STEP(hsum_epi32(fold512(a0)) - ws0[b] * 128, xs[b], acc0);
        acc1 = W8_BLOCK_STEP(hsum_epi32(fold512(a1)) - ws1[b] * 128, xs[b], acc1);
    }
    r[0] = acc0;
    r[1] = acc1;
}

/* int4, K % 128 == 0, G = 32, 64 or a multiple of 128. One 64-byte load holds two 64-value blocks
   (A then B: values 0..127 of a chunk); their low nibbles are values 0..31 and 64..95, the high ones
   32..63 and 96..127, so the activations come reordered per chunk of 128 to match (xz: 0..31, 64..95,
   32..63, 96..127; zorder_rows). Then per chunk: lo . x[0:64] and hi . x[64:128] are two vpdpbusd
   whose lanes 0..7 are block A's and 8..15 block B's. */
static inline __attribute__((always_inline)) void w4z_tile(const uint8_t* wr, const int8_t* xz, const float* xs,
                                                      const int32_t* xqs, const float* sg, const float* cg,
                                                      int64_t K, int64_t G, int64_t ng, int mt, float* r,
                                                      const uint8_t* pf) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m256 accf[8];
    float extra[8];
    for (int j = 0; j < mt; j++) {
        accf[j] = _mm256_setzero_ps();
        extra[j] = 0.f;
    }
/* group g's 8 int32 lanes v into row j's sums, as w4_tile does */
#define W4Z_GROUP(j, g, v)                                                                                   \
    do {                                                                                                     \
        const float d_ = xs[(j) * ng + (g)];                                                                 \
        accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(d_ * sg[g]), accf[j]);              \
        extra[j] += d_ * (float)xqs[(j) * ng + (g)] * cg[g];                                                 \
    } while (0)
    if (G >= 128) {
        for (int64_t g = 0; g < ng; g++) {
            for (int64_t o = g * G / 2; o < (g + 1) * G / 2; o += 64) _mm_prefetch((const char*)(pf + o), _MM_HINT_T0);
            __m512i a[8];
            for (int j = 0; j < mt; j++) a[j] = _mm512_setzero_si512();
            for (int64_t i = g * G; i < (g + 1) * G; i += 128) {
                const __m512i bytes = _mm512_loadu_si512((const void*)(wr + i / 2));
                const __m512i lo = _mm512_and_si512(bytes, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
                for (int j = 0; j < mt; j++) {
                    const __m512i x0 = _mm512_loadu_si512((const void*)(xz + j * K + i));
                    const __m512i x1 = _mm512_loadu_si512((const void*)(xz + j * K + i + 64));
                    a[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[j], lo, x0), hi, x1);
                }
            }
            for (int j = 0; j < mt; j++) W4Z_GROUP(j, g, fold512(a[j]));
        }
    } else { /* G = 64: a chunk is groups A, B; G = 32: a chunk is groups A-lo, A-hi, B-lo, B-hi */
        for (int64_t i = 0; i < K; i += 128) {
            _mm_prefetch((const char*)(pf + i / 2), _MM_HINT_T0);
            const __m512i bytes = _mm512_loadu_si512((const void*)(wr + i / 2));
            const __m512i lo = _mm512_and_si512(bytes, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
            const int64_t g = i / G;
            for (int j = 0; j < mt; j++) {
                const __m512i x0 = _mm512_loadu_si512((const void*)(xz + j * K + i));
                const __m512i x1 = _mm512_loadu_si512((const void*)(xz + j * K + i + 64));
                const __m512i zero = _mm512_setzero_si512();
                if (G == 64) {
                    const __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, x0), hi, x1);
                    W4Z_GROUP(j, g, _mm512_castsi512_si256(a));
                    W4Z_GROUP(j, g + 1, _mm512_extracti64x4_epi64(a, 1));
                } else {
                    const __m512i al = _mm512_dpbusd_epi32(zero, lo, x0), ah = _mm512_dpbusd_epi32(zero, hi, x1);
                    W4Z_GROUP(j, g, _mm512_castsi512_si256(al));
                    W4Z_GROUP(j, g + 1, _mm512_castsi512_si256(ah));
                    W4Z_GROUP(j, g + 2, _mm512_extracti64x4_epi64(al, 1));
                    W4Z_GROUP(j, g + 3, _mm512_extracti64x4_epi64(ah, 1));
                }
            }
        }
    }
#undef W4Z_GROUP
    for (int j = 0; j < mt; j++) r[j] = hsum_ps(accf[j]) + extra[j];
}

/* per weight row: scale[g] = xs[g] * s[g] and ex[g] = dx[g] * (z[g] - 8 s[g]) (dx = xs * code sum, per call),
   16 groups at a time */
static inline __attribute__((always_inline)) void w4z_row_scales(const uint16_t* s, const uint16_t* z, const float* xs,
        const float* dx, int64_t ng, float* scale, float* ex) {
    for (int64_t g = 0; g < ng; g += 16) {
        const __mmask16 m = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
        const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + g)), 16));
        const __m512 zv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, z + g)), 16));
        const __m512 cv = _mm512_sub_ps(zv, _mm512_mul_ps(_mm512_set1_ps(8.f), sv));
        _mm512_mask_storeu_ps(scale + g, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs + g), sv));
        _mm512_mask_storeu_ps(ex + g, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dx + g), cv));
    }
}
/* One activation row (single-stream decode), G % 128 == 0: two weight rows at a time sharing the activation
   loads, the float work per group cut to a broadcast and an FMA (scales and zero-point terms of a row
   computed 16 groups at a time first; the same products, so the same values as w4_tile). */
static inline __attribute__((always_inline)) void w4z_rows2(const uint8_t* w0, const uint8_t* w1, const int8_t* xz,
        const float* sc0, const float* ex0, const float* sc1, const float* ex1, int64_t G, int64_t ng,
        const uint8_t* pf, float* r) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float e0 = 0.f, e1 = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        for (int64_t i = g * G; i < (g + 1) * G; i += 128) {
            _mm_prefetch((const char*)(pf + i / 2), _MM_HINT_T1);
            _mm_prefetch((const char*)(pf + (w1 - w0) + i / 2), _MM_HINT_T1);
            const __m512i x0 = _mm512_loadu_si512((const void*)(xz + i));
            const __m512i x1 = _mm512_loadu_si512((const void*)(xz + i + 64));
            const __m512i b0 = _mm512_loadu_si512((const void*)(w0 + i / 2));
            const __m512i b1 = _mm512_loadu_si512((const void*)(w1 + i / 2));
            a0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a0, _mm512_and_si512(b0, low4), x0),
                                     _mm512_and_si512(_mm512_srli_epi16(b0, 4), low4), x1);
            a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a1, _mm512_and_si512(b1, low4), x0),
                                     _mm512_and_si512(_mm512_srli_epi16(b1, 4), low4), x1);
        }
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fold512(a0)), _mm256_set1_ps(sc0[g]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fold512(a1)), _mm256_set1_ps(sc1[g]), acc1);
        e0 += ex0[g];
        e1 += ex1[g];
    }
    r[0] = hsum_ps(acc0) + e0;
    r[1] = hsum_ps(acc1) + e1;
}
/* int4, G % 128 == 0, mt activation rows against one weight row; scales and zero-point terms precomputed
   per row (w4z_row_scales), as for one row */
static inline __attribute__((always_inline)) void w4z_tile128(const uint8_t* wr, const int8_t* xz, const float* sc,
        const float* ex, int64_t K, int64_t G, int64_t ng, int mt, float* r, const uint8_t* pf) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m256 accf[8];
    float e[8];
    for (int j = 0; j < mt; j++) {
        accf[j] = _mm256_setzero_ps();
        e[j] = 0.f;
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512i a[8];
        for (int j = 0; j < mt; j++) a[j] = _mm512_setzero_si512();
        for (int64_t i = g * G; i < (g + 1) * G; i += 128) {
            _mm_prefetch((const char*)(pf + i / 2), _MM_HINT_T0);
            const __m512i bytes = _mm512_loadu_si512((const void*)(wr + i / 2));
            const __m512i lo = _mm512_and_si512(bytes, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
            for (int j = 0; j < mt; j++)
                a[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[j], lo, _mm512_loadu_si512((const void*)(xz + j * K + i))),
                                           hi, _mm512_loadu_si512((const void*)(xz + j * K + i + 64)));
        }
        for (int j = 0; j < mt; j++) {
            accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fold512(a[j])), _mm256_set1_ps(sc[j * ng + g]), accf[j]);
            e[j] += ex[j * ng + g];
        }
    }
    for (int j = 0; j < mt; j++) r[j] = hsum_ps(accf[j]) + e[j];
}

/* int4, G % 128 == 0, W4Q_MIN_ROWS+ activation rows (a batched decode step; a small prompt chunk riding in one):
   as w8q_panel for int8, the activation rows transposed so that one vpdpbusd adds 8 rows' partial dot products
   against one 8-code broadcast of a weight row, where w4z_tile128 paid a fold, a conversion and an FMA per row per
   group (and a 4-row tile read each weight row twice at 8 rows). Bit-identical to it: lanes 2m, 2m + 1 of acc[p]
   hold exactly row m's integer lanes 2p, 2p + 1 of the 256-bit kernels (lane l of a 128-value chunk: values
   4l..4l+3 of each 32), and the float steps (the scale and zero-point products, an FMA per group, the sum of the
   zero-point terms, hsum_ps's tree) are the same operations in the same order, on 8 rows at once.
   A weight row is unpacked once a pass into codes in the order of its bytes' nibbles (u, per 128-value chunk: low
   nibbles = values 0..31, 64..95, then high = 32..63, 96..127), each 8 of them one 64-bit broadcast; xt (per tile
   [K/8][16] dwords, in u's order) holds in lane 2m + h row m's 4 codes of half h of the same 8 values. */
#define W4Q_NT 2  /* weight rows a pass: 3 measured the same, 4 slower (their accumulators spill) */
#define W4Q_AHEAD 2
/* from 5 rows (the 0.5B's four int4 shapes x 24, cold, alternating builds, medians: 4 rows 13.6 / 20.0 ms on
   w4z_tile128 vs 17.3 / 25.4 here, 5 rows 18.6 / 22.2 vs 17.6 / 21.1, 6 rows 20.1 vs 17.5, 8 rows 25.7 vs 17.1, 12
   rows 38.4 vs 31.0, 16 rows 51.7 vs 33.2): a tile costs the same whatever its rows */
#define W4Q_MIN_ROWS 5
static inline __attribute__((always_inline)) void w4q_unpack(const uint8_t* wr, int64_t K, uint8_t* u,
                                                             const uint8_t* pf) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int64_t i = 0; i < K; i += 128) {
        _mm_prefetch((const char*)(pf + i / 2), _MM_HINT_T1);
        const __m512i b = _mm512_loadu_si512((const void*)(wr + i / 2));
        _mm512_store_si512((void*)(u + i), _mm512_and_si512(b, low4));
        _mm512_store_si512((void*)(u + i + 64), _mm512_and_si512(_mm512_srli_epi16(b, 4), low4));
    }
}

/* W4Q_NT unpacked weight rows (u, [W4Q_NT][K]; their bf16 scales s and zeros z, row stride ng) against one tile of 8
   activation rows (xt; xg: per group 16 lanes of scales, then 16 of scale x code sum): res[t] lane 2m = row m's
   output for weight row t, before the bias */
static inline __attribute__((always_inline)) void w4q_panel(const uint8_t* u, int64_t K, const __m512i* xt,
        const float* xg, const uint16_t* s, const uint16_t* z, int64_t G, int64_t ng, __m512* res) {
    __m512 f[W4Q_NT][4], e[W4Q_NT];
    for (int t = 0; t < W4Q_NT; t++) {
        for (int p = 0; p < 4; p++) f[t][p] = _mm512_setzero_ps();
        e[t] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512i a[W4Q_NT][4];
        for (int t = 0; t < W4Q_NT; t++)
            for (int p = 0; p < 4; p++) a[t][p] = _mm512_setzero_si512();
        for (int64_t k = g * G; k < (g + 1) * G; k += 32)
            for (int p = 0; p < 4; p++) {
                const __m512i xv = _mm512_load_si512((const void*)(xt + k / 8 + p));
                for (int t = 0; t < W4Q_NT; t++)
                    a[t][p] = _mm512_dpbusd_epi32(a[t][p], _mm512_set1_epi64(*(const i64_unaligned*)(u + t * K + k + 8 * p)),
                                                  xv);
            }
        const __m512 xs = _mm512_load_ps(xg + g * 32), dx = _mm512_load_ps(xg + g * 32 + 16);
        for (int t = 0; t < W4Q_NT; t++) {
            const float sv = bf16_to_f32(s[t * ng + g]);
            const float cv = bf16_to_f32(z[t * ng + g]) - 8.f * sv;  /* w4z_row_scales' z - 8 s */
            const __m512 scv = _mm512_mul_ps(xs, _mm512_set1_ps(sv));
            for (int p = 0; p < 4; p++) f[t][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[t][p]), scv, f[t][p]);
            e[t] = _mm512_add_ps(e[t], _mm512_mul_ps(dx, _mm512_set1_ps(cv)));
        }
    }
    for (int t = 0; t < W4Q_NT; t++) {
        /* hsum_ps of lanes l = 2p + h: (l0 + l4) + (l2 + l6), (l1 + l5) + (l3 + l7), then the two */
        const __m512 v = _mm512_add_ps(_mm512_add_ps(f[t][0], f[t][2]), _mm512_add_ps(f[t][1], f[t][3]));
        res[t] = _mm512_add_ps(_mm512_add_ps(v, _mm512_permute_ps(v, 0xB1)), e[t]);
    }
}

/* The batch kernels' transposed activation tiles and their per-tile scales: both 64-byte aligned, or neither
   (returns -1, nothing left allocated) */
static int tile_buffers(size_t xt_bytes, size_t xst_floats, void** xt, float** xst) {
    *xt = NULL;
    *xst = NULL;
    if (posix_memalign(xt, 64, xt_bytes) != 0) *xt = NULL;
    if (posix_memalign((void**)xst, 64, sizeof(float) * xst_floats) != 0) *xst = NULL;
    if (*xt && *xst) return 0;
    free(*xt);
    free(*xst);
    *xt = NULL;
    *xst = NULL;
    return -1;
}

/* The W4Q path of linear_w4_avx512: q, the activation codes in their natural order, xs / xsum per row and group */
static int linear_w4q_avx512(const int8_t* q, const float* xs, const int32_t* xsum, int64_t M, int64_t K, int64_t G,
                             const uint8_t* w, const uint16_t* s, const uint16_t* z, const float* bias, int64_t N,
                             float* y, int nthreads, int accumulate) {
    static const int64_t vbase[4] = {0, 64, 32, 96};  /* the values of u's quarters of a chunk */
    const int64_t ng = K / G, tiles = (M + 7) / 8;
    __m512i* xt;
    float* xst;
    if (tile_buffers((size_t)(tiles * K * 8), (size_t)(tiles * ng * 32), (void**)&xt, &xst) != 0) return -1;
    uint32_t* xd = (uint32_t*)xt;
    for (int64_t tile = 0; tile < tiles; tile++)
        for (int64_t j = 0; j < K / 8; j++) {  /* slot j: chunk j / 16, quarter (j / 4) % 4, 8 values (j % 4) */
            const int64_t v = (j / 16) * 128 + vbase[(j / 4) % 4] + 8 * (j % 4);
            for (int64_t l = 0; l < 16; l++) {
                const int64_t m = tile * 8 + l / 2;
                uint32_t c = 0;  /* a row past M: x = 0 (its outputs are not written) */
                if (m < M) memcpy(&c, q + m * K + v + 4 * (l % 2), 4);
                xd[(tile * (K / 8) + j) * 16 + l] = c;
            }
        }
    for (int64_t tile = 0; tile < tiles; tile++)  /* per tile and group: 16 lanes of xs, then 16 of xs * code sum */
        for (int64_t g = 0; g < ng; g++)
            for (int64_t l = 0; l < 16; l++) {
                const int64_t m = tile * 8 + l / 2;
                float* o = xst + (tile * ng + g) * 32;
                o[l] = m < M ? xs[m * ng + g] : 0.f;
                o[16 + l] = m < M ? xs[m * ng + g] * (float)xsum[m * ng + g] : 0.f;
            }
    /* the weights W4Q_AHEAD panels on are asked into L2 while a panel is unpacked, as w8q_panel's */
    const int64_t np = (N + W4Q_NT - 1) / W4Q_NT;
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t p = 0; p < np; p++) {
        const int64_t n0 = p * W4Q_NT, nt = N - n0 < W4Q_NT ? N - n0 : W4Q_NT;
        const int64_t nf = p + W4Q_AHEAD < np - 1 ? n0 + W4Q_AHEAD * W4Q_NT : n0;  /* a full panel */
        uint8_t u[W4Q_NT * K] __attribute__((aligned(64)));
        uint16_t sp[W4Q_NT * ng], zp[W4Q_NT * ng];
        const int64_t nf_last = nf + W4Q_NT - 1 < N ? nf + W4Q_NT - 1 : N - 1;
        for (int64_t t = 0; t < W4Q_NT; t++) {  /* a last panel short of W4Q_NT rows repeats its last row */
            const int64_t n = n0 + (t < nt ? t : nt - 1);
            w4q_unpack(w + n * (K / 2), K, u + t * K, w + (nf + t < N ? nf + t : N - 1) * (K / 2));
            memcpy(sp + t * ng, s + n * ng, sizeof(uint16_t) * (size_t)ng);
            memcpy(zp + t * ng, z + n * ng, sizeof(uint16_t) * (size_t)ng);
        }
        w4_prefetch_params(s, z, nf * ng, (nf_last + 1 - nf) * ng);  /* that panel's scales and zeros */
        for (int64_t tile = 0; tile < tiles; tile++) {
            __m512 res[W4Q_NT];
            float out[16] __attribute__((aligned(64)));
            w4q_panel(u, K, xt + tile * (K / 8), xst + tile * ng * 32, sp, zp, G, ng, res);
            const int64_t mt = M - tile * 8 < 8 ? M - tile * 8 : 8;
            for (int64_t t = 0; t < nt; t++) {
                _mm512_store_ps(out, res[t]);
                for (int64_t m = 0; m < mt; m++) out_store(y + (tile * 8 + m) * N + n0 + t, out[2 * m], bias, n0 + t, accumulate);
            }
        }
    }
    free(xt);
    free(xst);
    return 0;
}

/* Up to 8 activation rows per pass over a weight row (32 vector registers hold their accumulators) */
#define ZTILE_SWITCH(call)                                                                                   \
    switch (mt) {                                                                                            \
        case 8: call(8); break;                                                                              \
        case 7: call(7); break;                                                                              \
        case 6: call(6); break;                                                                              \
        case 5: call(5); break;                                                                              \
        case 4: call(4); break;                                                                              \
        case 3: call(3); break;                                                                              \
        case 2: call(2); break;                                                                              \
        default: call(1); break;                                                                             \
    }

static int linear_w8_avx512(const float* x, int64_t M, int64_t K, int64_t B, const int8_t* w, const float* ws,
                            const int32_t* wsum, const float* bias, int64_t N, float* y, int nthreads,
                            const float* norm_w, float eps, int accumulate) {
    if (K <= 0 || B <= 0 || B % 64 != 0 || K % B != 0)
        return linear_w8_avx512y(x, M, K, B, w, ws, bias, N, y, nthreads, norm_w, eps, accumulate);
    const int64_t nb = K / B;
    scratch_t sc;
    if (scratch_init(&sc, M, K, nb) != 0) return -1;
    quantize_rows(x, M, K, B, norm_w, eps, sc.tmp, sc.q, sc.scale, sc.qsum, nthreads);
    uint8_t* xu = (uint8_t*)sc.q;
    const __m512i bias128 = _mm512_set1_epi8((char)0x80);
    for (int64_t i = 0; i < M * K; i += 64)  /* x + 128 (M K is a multiple of 64) */
        _mm512_storeu_si512((void*)(xu + i), _mm512_xor_si512(_mm512_loadu_si512((const void*)(xu + i)), bias128));
    const float* xs = sc.scale;
    const int64_t ahead = prefetch_rows_at(K, M == 1 ? PF_BYTES_ONE_ROW : PF_BYTES);
    int32_t* own_sums = NULL;
    if (!wsum) {  /* not prepared with the weights: taken now (a pass over them) */
        own_sums = (int32_t*)malloc(sizeof(int32_t) * (size_t)(N * nb));
        if (!own_sums) {
            free(sc.buf);
            return -1;
        }
        dq_w8_block_sums(w, N, K, B, own_sums, nthreads);
        wsum = own_sums;
    }
    if (M == 1) {
#pragma omp parallel for schedule(guided) num_threads(nthreads)
        for (int64_t p = 0; p < (N + 1) / 2; p++) {
            const int64_t n = 2 * p, n1 = n + 1 < N ? n + 1 : n;
            const int64_t nf = n + ahead + 1 < N ? n + ahead : n;
            float r[2];
            w8z_rows2(w + n * K, w + n1 * K, xu, xs, wsum + n * nb, wsum + n1 * nb, B, nb, w + nf * K, r);
            for (int64_t j = 0; j < 2 && n + j < N; j++) w8_out(y + n + j, r[j], ws, bias, n + j, accumulate);
        }
        free(own_sums);
        free(sc.buf);
        return 0;
    }
    if (M < W8Q_MIN_ROWS) {
#pragma omp parallel for schedule(guided) num_threads(nthreads)
        for (int64_t n = 0; n < N; n++) {
            const int8_t* pf = w + (n + ahead < N ? n + ahead : n) * K;
            float r[W8Q_MIN_ROWS - 1];
            switch (M) {  /* constant tile sizes: the accumulators stay in registers */
                case 3: w8z_tile(w + n * K, xu, xs, wsum + n * nb, K, B, nb, 3, r, pf); break;
                default: w8z_tile(w + n * K, xu, xs, wsum + n * nb, K, B, nb, 2, r, pf); break;
            }
            for (int64_t j = 0; j < M; j++) w8_out(y + j * N + n, r[j], ws, bias, n, accumulate);
        }
        free(own_sums);
        free(sc.buf);
        return 0;
    }
    /* W8Q_MIN_ROWS+ rows: w8q_panel over row tiles of 8 (xt: per tile [K/8][16] dwords; xst: per tile [nb][16]
       scales) */
    const int64_t tiles = (M + 7) / 8;
    const int pairs = tiles > 1;  /* past 8 rows: w8q2_panel, tiles in pairs (an odd last one with a padding tile) */
    const int64_t alloc_tiles = pairs ? (tiles + 1) / 2 * 2 : tiles;
    uint32_t* xt;
    float* xst;
    if (tile_buffers((size_t)(alloc_tiles * K * 8), (size_t)(alloc_tiles * nb * 16), (void**)&xt, &xst) != 0) {
        free(own_sums);
        free(sc.buf);
        return -1;
    }
    for (int64_t tile = 0; tile < alloc_tiles; tile++)
        for (int64_t k8 = 0; k8 < K / 8; k8++)
            for (int64_t l = 0; l < 16; l++) {
                const int64_t m = tile * 8 + l / 2;
                uint32_t v = 0x80808080u;  /* a row past M: x = 0 (its outputs are not written) */
                if (m < M) memcpy(&v, xu + m * K + 8 * k8 + 4 * (l % 2), 4);
                xt[(tile * (K / 8) + k8) * 16 + l] = v;
            }
    for (int64_t tile = 0; tile < alloc_tiles; tile++)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t l = 0; l < 16; l++) {
                const int64_t m = tile * 8 + l / 2;
                xst[(tile * nb + b) * 16 + l] = m < M ? xs[m * nb + b] : 0.f;
            }
    if (pairs) {
        const int64_t np2 = N / W8Q_NT2;  /* full panels; the last N % W8Q_NT2 rows below */
#pragma omp parallel for schedule(guided) num_threads(nthreads)
        for (int64_t p = 0; p < np2; p++) {
            const int64_t n0 = p * W8Q_NT2, pn = p + W8Q_AHEAD < np2 ? (p + W8Q_AHEAD) * W8Q_NT2 : n0;
            float out[2 * W8Q_NT2 * 16] __attribute__((aligned(64)));  /* (w8q_store: aligned loads) */
            for (int64_t tile = 0; tile < alloc_tiles; tile += 2) {
                w8q2_panel(w + n0 * K, K, xt + tile * (K / 8) * 16, xt + (tile + 1) * (K / 8) * 16, xst + tile * nb * 16,
                           xst + (tile + 1) * nb * 16, wsum + n0 * nb, B, nb, w + pn * K, out);
                for (int64_t u = 0; u < 2; u++) {
                    const int64_t m0 = (tile + u) * 8, mt = M - m0 < 8 ? M - m0 : 8;  /* <= 0: the padding tile */
                    if (mt > 0)
                        w8q_store(out + u * W8Q_NT2 * 16, W8Q_NT2 / 4, ws, bias, n0, y + m0 * N, N, mt, accumulate);
                }
            }
        }
    }
    /* w8q_panel takes the rows from nfirst on: all of them, or past 8 rows the last N % W8Q_NT2 */
    const int64_t nfirst = pairs ? N / W8Q_NT2 * W8Q_NT2 : 0, np = (N - nfirst + W8Q_NT - 1) / W8Q_NT;
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t p = 0; p < np; p++) {
        const int64_t n0 = nfirst + p * W8Q_NT, nt = N - n0 < W8Q_NT ? N - n0 : W8Q_NT;
        const int64_t pn = p + W8Q_AHEAD < np - 1 ? n0 + W8Q_AHEAD * W8Q_NT : n0;  /* W8Q_AHEAD panels on: a full one */
        int64_t off[W8Q_NT];
        const int32_t* wsr[W8Q_NT];
        for (int64_t t = 0; t < W8Q_NT; t++) {  /* a last panel short of W8Q_NT rows repeats its last row */
            off[t] = (t < nt ? t : nt - 1) * K;
            wsr[t] = wsum + (n0 + (t < nt ? t : nt - 1)) * nb;
        }
        float out[W8Q_NT * 16] __attribute__((aligned(64)));
        for (int64_t tile = 0; tile < tiles; tile++) {
            w8q_panel(w + n0 * K, off, xt + tile * (K / 8) * 16, xst + tile * nb * 16, wsr, B, nb, w + pn * K, out);
            const int64_t mt = M - tile * 8 < 8 ? M - tile * 8 : 8;
            if (nt == W8Q_NT) {
                w8q_store(out, W8Q_NT / 4, ws, bias, n0, y + tile * 8 * N, N, mt, accumulate);
                continue;
            }
            for (int64_t t = 0; t < nt; t++)
                for (int64_t j = 0; j < mt; j++)
                    w8_out(y + (tile * 8 + j) * N + n0 + t, out[t * 16 + 2 * j], ws, bias, n0 + t, accumulate);
        }
    }
    free(own_sums);
    free(xt);
    free(xst);
    free(sc.buf);
    return 0;
}

/* x codes [M, K] in place, per chunk of 128: 0..31, 32..63, 64..95, 96..127 -> 0..31, 64..95, 32..63, 96..127 */
static void zorder_rows(int8_t* q, int64_t M, int64_t K) {
    for (int64_t i = 0; i < M * K; i += 128) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(q + i + 32));
        _mm256_storeu_si256((__m256i*)(q + i + 32), _mm256_loadu_si256((const __m256i*)(q + i + 64)));
        _mm256_storeu_si256((__m256i*)(q + i + 64), b);
    }
}

static int linear_w4_avx512(const float* x, int64_t M, int64_t K, int64_t G, const uint8_t* w, const uint16_t* s,
                            const uint16_t* z, const float* bias, int64_t N, float* y, int nthreads,
                            const float* norm_w, float eps, int accumulate) {
    if (K <= 0 || K % 128 != 0 || G <= 0 || G > 256 || K % G != 0 || (G != 32 && G != 64 && G % 128 != 0))
        return linear_w4_avx512y(x, M, K, G, w, s, z, bias, N, y, nthreads, norm_w, eps, accumulate);
    const int64_t ng = K / G;
    scratch_t sc;
    if (scratch_init(&sc, M, K, ng) != 0) return -1;
    quantize_rows(x, M, K, G, norm_w, eps, sc.tmp, sc.q, sc.scale, sc.qsum, nthreads);
    if (M >= W4Q_MIN_ROWS && G % 128 == 0) {
        const int rc = linear_w4q_avx512(sc.q, sc.scale, sc.qsum, M, K, G, w, s, z, bias, N, y, nthreads, accumulate);
        free(sc.buf);
        return rc;
    }
    zorder_rows(sc.q, M, K);
    const int8_t* xz = sc.q;
    const float* xs = sc.scale;
    const int32_t* xsum = sc.qsum;
    const int64_t ahead = prefetch_rows_at(K / 2, M == 1 && G % 128 == 0 ? PF_BYTES_ONE_ROW : PF_BYTES);
    if (M == 1 && G % 128 == 0) {
        float dx[ng];
        for (int64_t g = 0; g < ng; g++) dx[g] = xs[g] * (float)xsum[g];
        const int64_t N2 = (N + 1) / 2;
#pragma omp parallel for schedule(guided) num_threads(nthreads)
        for (int64_t p = 0; p < N2; p++) {
            const int64_t n = 2 * p, n1 = n + 1 < N ? n + 1 : n;
            const int64_t nf = n + ahead + 1 < N ? n + ahead : n;
            w4_prefetch_params(s, z, nf * ng, (nf + 1 < N ? 2 : 1) * ng);  /* rows nf and nf + 1 (the last: nf) */
            float sc0[ng], ex0[ng], sc1[ng], ex1[ng], r[2];
            w4z_row_scales(s + n * ng, z + n * ng, xs, dx, ng, sc0, ex0);
            w4z_row_scales(s + n1 * ng, z + n1 * ng, xs, dx, ng, sc1, ex1);
            w4z_rows2(w + n * (K / 2), w + n1 * (K / 2), xz, sc0, ex0, sc1, ex1, G, ng, w + nf * (K / 2), r);
            for (int64_t j = 0; j < 2 && n + j < N; j++) {
                float v = r[j];
                if (bias) v += bias[n + j];
                y[n + j] = accumulate ? y[n + j] + v : v;
            }
        }
        free(sc.buf);
        return 0;
    }
    if (G % 128 == 0) {
        float* dx = (float*)malloc(sizeof(float) * (size_t)(M * ng));  /* (a prefill chunk: not on the stack) */
        if (!dx) {
            free(sc.buf);
            return -1;
        }
        for (int64_t i = 0; i < M * ng; i++) dx[i] = xs[i] * (float)xsum[i];
#pragma omp parallel for schedule(guided) num_threads(nthreads)
        for (int64_t n = 0; n < N; n++) {
            const int64_t nf = n + ahead < N ? n + ahead : n;
            float sc4[4 * ng], ex4[4 * ng], r[4];
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int64_t mt = M - m0 < 4 ? M - m0 : 4;
                for (int64_t j = 0; j < mt; j++)
                    w4z_row_scales(s + n * ng, z + n * ng, xs + (m0 + j) * ng, dx + (m0 + j) * ng, ng, sc4 + j * ng,
                                   ex4 + j * ng);
#define W4T(T) w4z_tile128(w + n * (K / 2), xz + m0 * K, sc4, ex4, K, G, ng, T, r, w + nf * (K / 2))
                switch (mt) {  /* tiles of 4 rows: measured faster here than 8 (2..4 rows; more take linear_w4q_avx512) */
                    case 4: W4T(4); break;
                    case 3: W4T(3); break;
                    case 2: W4T(2); break;
                    default: W4T(1); break;
                }
#undef W4T
                for (int64_t j = 0; j < mt; j++) out_store(y + (m0 + j) * N + n, r[j], bias, n, accumulate);
            }
        }
        free(dx);
        free(sc.buf);
        return 0;
    }
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wr = w + n * (K / 2);
        const int64_t nf = n + ahead < N ? n + ahead : n;
        const uint8_t* pf = w + nf * (K / 2);
        _mm_prefetch((const char*)(s + nf * ng), _MM_HINT_T0);
        _mm_prefetch((const char*)(z + nf * ng), _MM_HINT_T0);
        float sg[ng], cg[ng];
        for (int64_t g = 0; g < ng; g++) {
            sg[g] = bf16_to_f32(s[n * ng + g]);
            cg[g] = bf16_to_f32(z[n * ng + g]) - 8.f * sg[g];
        }
        float r[8];
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t mt = M - m0 < 8 ? M - m0 : 8;
#define W4Z(T) w4z_tile(wr, xz + m0 * K, xs + m0 * ng, xsum + m0 * ng, sg, cg, K, G, ng, T, r, pf)
            ZTILE_SWITCH(W4Z)
#undef W4Z
            for (int64_t j = 0; j < mt; j++) out_store(y + (m0 + j) * N + n, r[j], bias, n, accumulate);
        }
    }
    free(sc.buf);
    return 0;
}
#undef ZTILE_SWITCH
#pragma GCC pop_options
#else
#define DQ_HAVE_AVX512 0
#endif

/* Which kernels run: 0 = not chosen yet, DQ_ISA_AVX2, DQ_ISA_AVXVNNI, DQ_ISA_AVX512VNNI (dq_set_isa;
   default: the best this CPU has). Chosen once, before the first call, by ckernels.py. */
#define DQ_ISA_AVX2 1
#define DQ_ISA_AVXVNNI 2
#define DQ_ISA_AVX512VNNI 3
static int dq_isa_selected = 0;  /* read and written with relaxed atomics: tests switch it between calls */

static int dq_isa_supported(int isa) {
    if (isa == DQ_ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if DQ_HAVE_AVXVNNI  /* older compilers do not know the feature name */
    if (isa == DQ_ISA_AVXVNNI) return dq_isa_supported(DQ_ISA_AVX2) && __builtin_cpu_supports("avxvnni");
#endif
#if DQ_HAVE_AVX512  /* (libgcc also checks that the OS saves the 512-bit registers) */
    if (isa == DQ_ISA_AVX512VNNI)
        return dq_isa_supported(DQ_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

/* 0 = the best available; returns the instruction set now used, or -1 when `isa` is not available here. */
int dq_set_isa(int isa) {
    __builtin_cpu_init();
    if (isa == 0)
        isa = dq_isa_supported(DQ_ISA_AVX512VNNI) ? DQ_ISA_AVX512VNNI
              : dq_isa_supported(DQ_ISA_AVXVNNI)  ? DQ_ISA_AVXVNNI
                                                  : DQ_ISA_AVX2;
    if (!dq_isa_supported(isa)) return -1;
    __atomic_store_n(&dq_isa_selected, isa, __ATOMIC_RELAXED);
    return isa;
}

int dq_isa(void) {
    const int isa = __atomic_load_n(&dq_isa_selected, __ATOMIC_RELAXED);
    return isa ? isa : dq_set_isa(0);
}

/* The kernels ONE activation row (a single-stream decode step) takes, per weight width, where they stream the
   weights faster than the chosen set's: 0 = the chosen set's; DQ_ISA_AVX2; DQ_ISA_AVXVNNI = the 256-bit VNNI
   kernels (VEX-encoded where the CPU has AVX-VNNI, else the same instructions EVEX-encoded on AVX512-VNNI);
   DQ_ISA_AVX512VNNI. The kernel plan decides (plan.row_isas says what was measured); results are the same bit
   for bit whichever runs. Index 0: int8 weights, 1: int4. */
static int dq_row_isa_sel[2] = {0, 0};

static int dq_row_isa_supported(int isa) {
    if (isa == 0) return 1;
    if (isa == DQ_ISA_AVXVNNI) return dq_isa_supported(DQ_ISA_AVXVNNI) || dq_isa_supported(DQ_ISA_AVX512VNNI);
    return dq_isa_supported(isa);
}

/* Set the one-row kernels of `bits`-bit weights (8 or 4); returns the previous setting, or -1 (bad width, or an
   instruction set this CPU / build lacks). */
int dq_set_row_isa(int bits, int isa) {
    if ((bits != 8 && bits != 4) || isa < 0 || isa > DQ_ISA_AVX512VNNI) return -1;
    __builtin_cpu_init();
    if (!dq_row_isa_supported(isa)) return -1;
    return __atomic_exchange_n(&dq_row_isa_sel[bits == 4], isa, __ATOMIC_RELAXED);
}

int dq_row_isa(int bits) { return __atomic_load_n(&dq_row_isa_sel[bits == 4], __ATOMIC_RELAXED); }

/* The instruction set a call with M activation rows of `bits`-bit weights runs on (the dispatch below; tests
   ask it too). */
int dq_call_isa(int bits, int64_t M) {
    const int row = M == 1 ? dq_row_isa(bits) : 0;
    return row ? row : dq_isa();
}

/* y = f(x) @ (w * ws[:, None])^T + bias, where f = RMSNorm(., norm_w, eps) when norm_w is given;
   accumulate: y += (the residual add of a pre-norm block, in place). wsum: the weights' block sums
   (dq_w8_block_sums), or NULL (a batch on AVX-512 then takes them itself). 0, or -1 (bad block size /
   out of memory). */
int dq_linear_w8(const float* x, int64_t M, int64_t K, int64_t B, const int8_t* w, const float* ws,
                 const int32_t* wsum, const float* bias, int64_t N, float* y, int nthreads, const float* norm_w,
                 float eps, int accumulate) {
    if (M <= 0) return 0;  /* no rows: nothing to compute (the batch kernels assume one) */
    const int isa = dq_call_isa(8, M);
#if DQ_HAVE_AVX512
    if (isa == DQ_ISA_AVX512VNNI)
        return linear_w8_avx512(x, M, K, B, w, ws, wsum, bias, N, y, nthreads, norm_w, eps, accumulate);
    if (isa == DQ_ISA_AVXVNNI && !dq_isa_supported(DQ_ISA_AVXVNNI))  /* the EVEX-encoded 256-bit VNNI kernels */
        return linear_w8_avx512y(x, M, K, B, w, ws, bias, N, y, nthreads, norm_w, eps, accumulate);
#endif
#if DQ_HAVE_AVXVNNI
    if (isa == DQ_ISA_AVXVNNI)
        return linear_w8_avxvnni(x, M, K, B, w, ws, bias, N, y, nthreads, norm_w, eps, accumulate);
#endif
    return linear_w8_avx2(x, M, K, B, w, ws, bias, N, y, nthreads, norm_w, eps, accumulate);
}

/* y = f(x) @ W^T + bias with W[n, k] = (code - 8) * s[n, k/G] + z[n, k/G]; f, accumulate as above. */
int dq_linear_w4(const float* x, int64_t M, int64_t K, int64_t G, const uint8_t* w, const uint16_t* s,
                 const uint16_t* z, const float* bias, int64_t N, float* y, int nthreads, const float* norm_w,
                 float eps, int accumulate) {
    if (M <= 0) return 0;
    const int isa = dq_call_isa(4, M);
#if DQ_HAVE_AVX512
    if (isa == DQ_ISA_AVX512VNNI)
        return linear_w4_avx512(x, M, K, G, w, s, z, bias, N, y, nthreads, norm_w, eps, accumulate);
    if (isa == DQ_ISA_AVXVNNI && !dq_isa_supported(DQ_ISA_AVXVNNI))  /* the EVEX-encoded 256-bit VNNI kernels */
        return linear_w4_avx512y(x, M, K, G, w, s, z, bias, N, y, nthreads, norm_w, eps, accumulate);
#endif
#if DQ_HAVE_AVXVNNI
    if (isa == DQ_ISA_AVXVNNI)
        return linear_w4_avxvnni(x, M, K, G, w, s, z, bias, N, y, nthreads, norm_w, eps, accumulate);
#endif
    return linear_w4_avx2(x, M, K, G, w, s, z, bias, N, y, nthreads, norm_w, eps, accumulate);
}

/* Portable int4 codes [N, K] (uint8 0..15) -> the kernel layout above, [N, K/2]. */
void dq_pack_w4(const uint8_t* codes, int64_t N, int64_t K, uint8_t* out) {
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* c = codes + n * K;
        uint8_t* o = out + n * (K / 2);
        for (int64_t b = 0; b < K; b += 64)
            for (int64_t j = 0; j < 32; j++)
                o[b / 2 + j] = (uint8_t)((c[b + j] & 0x0F) | ((c[b + j + 32] & 0x0F) << 4));
    }
}

static inline float dot_f32(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum_ps(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* rotate-half RoPE of one head: out[i] = x[i] c[i] - x[i+h] s[i], out[i+h] = x[i+h] c[i+h] + x[i] s[i+h] */
static inline void rope_head(const float* x, const float* c, const float* s, int64_t hd, float* out) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        out[i] = a * c[i] - b * s[i];
        out[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* exp(x), 8 lanes, x clamped to [-87, 88]: 2^n p(r) with r = x - n ln2 (ln2 in two parts) and Cephes' expf
   polynomial (about 1 ulp) */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
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
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Decode attention, one query head of one sequence: the keys/values of its kv head at positions 0..len-1
   (kb/vb [len, hd]) -> o [hd]. Three passes, each shaped for the CPU rather than one position at a time:
   - scores, 8 positions at a time with one accumulator each (a position's dot product is one chain of hd/8 FMAs;
     8 independent chains keep both FMA units busy where one chain per position waited on each FMA's latency),
     reduced to the 8 sums with one hadd tree; raw dot products (the 1/sqrt(hd) scale goes into the exponent);
   - softmax weights exp((s - max) * scale), 8 at a time (exp_ps);
   - o = sum_l w_l v_l with o's columns in registers across a block of positions (8 registers: 64 columns), then
     o * 1/sum.
   The scores and values passes take a range of positions [l0, l1): attn_tile runs them a block at a time over
   several query heads that read the same keys/values. A query's result does not depend on the others it runs with
   (each score and each column sums in the same order, blocks or not): every batch gives a row the same bytes. */
static inline void attn_scores(const float* q, const float* kb, int64_t l0, int64_t l1, int64_t hd, float* sc) {
    const int64_t hd8 = hd & ~(int64_t)7;
    int64_t l = l0;
    for (; l + 8 <= l1; l += 8) {
        const float* k = kb + l * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t i = 0; i < hd8; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + hd + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * hd + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * hd + i), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * hd + i), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * hd + i), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * hd + i), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * hd + i), a7);
        }
        /* hadd tree: lanes of s0123 are [a0..a3 low-half sums | a0..a3 high-half sums], likewise s4567 */
        const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
        _mm256_storeu_ps(sc + l, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                               _mm256_permute2f128_ps(s0123, s4567, 0x31)));
        for (int64_t i = hd8; i < hd; i++)
            for (int j = 0; j < 8; j++) sc[l + j] += q[i] * k[j * hd + i];
    }
    for (; l < l1; l++) sc[l] = dot_f32(q, kb + l * hd, hd);
}

/* sc[l] <- exp((sc[l] - max) * scale); returns their sum */
static inline float attn_softmax_weights(float* sc, int64_t len, float scale) {
    float mx = -INFINITY;
    int64_t l = 0;
    if (len >= 8) {
        __m256 vm = _mm256_loadu_ps(sc);
        for (l = 8; l + 8 <= len; l += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sc + l));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        mx = _mm_cvtss_f32(m4);
    }
    for (; l < len; l++) mx = sc[l] > mx ? sc[l] : mx;
    const __m256 vmx = _mm256_set1_ps(mx), vscale = _mm256_set1_ps(scale);
    __m256 vsum = _mm256_setzero_ps();
    for (l = 0; l + 8 <= len; l += 8) {
        const __m256 e = exp_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + l), vmx), vscale));
        _mm256_storeu_ps(sc + l, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum_ps(vsum);
    for (; l < len; l++) {
        sc[l] = expf((sc[l] - mx) * scale);
        sum += sc[l];
    }
    return sum;
}

/* o[c .. c + 8 NACC) (+)= sum over l in [l0, l1) of w[l] vb[l, c ..] (first: o's earlier value not read), times inv
   when last: NACC column registers held across the positions */
static inline __attribute__((always_inline)) void attn_values_cols(const float* w, const float* vb, int64_t l0,
                                                                   int64_t l1, int64_t hd, int64_t c, float* o,
                                                                   int first, int last, float inv, const int nacc) {
    __m256 acc[8];
    for (int j = 0; j < nacc; j++) acc[j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + c + 8 * j);
    for (int64_t l = l0; l < l1; l++) {
        const __m256 wl = _mm256_set1_ps(w[l]);
        const float* v = vb + l * hd + c;
        for (int j = 0; j < nacc; j++) acc[j] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(v + 8 * j), acc[j]);
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int j = 0; j < nacc; j++) _mm256_storeu_ps(o + c + 8 * j, last ? _mm256_mul_ps(acc[j], vinv) : acc[j]);
}

static void attn_values(const float* w, const float* vb, int64_t l0, int64_t l1, int64_t hd, int first, int last,
                        float inv, float* o) {
    int64_t c = 0;
    for (; c + 64 <= hd; c += 64) attn_values_cols(w, vb, l0, l1, hd, c, o, first, last, inv, 8);
    for (; c + 32 <= hd; c += 32) attn_values_cols(w, vb, l0, l1, hd, c, o, first, last, inv, 4);
    for (; c + 8 <= hd; c += 8) attn_values_cols(w, vb, l0, l1, hd, c, o, first, last, inv, 1);
    for (; c < hd; c++) {
        float a = first ? 0.f : o[c];
        for (int64_t l = l0; l < l1; l++) a += w[l] * vb[l * hd + c];
        o[c] = last ? a * inv : a;
    }
}

/* Query heads that read one kv head's keys/values: rows b0.. of one cache slot (a decode row alone; a prompt chunk's
   rows, which share their slot), queries q0..q1 - 1 of them in order (query q: row b0 + q / group, head
   kvh * group + q % group) */
typedef struct {
    int64_t b0, q0, q1, kvh;
} attn_tile_t;

/* at most this many query heads a tile (their scores: ATT_TILE x the longest length, per thread) */
#define ATT_TILE 16
/* positions a block: one block of a kv head's keys (then values) stays in L1 while each query of a tile reads it,
   where one query at a time read a whole row's keys and values from L2 per query head (a kv head serves 7 query
   heads on the 0.5B, a prompt chunk's rows all read one slot) */
#define ATT_BLOCK_BYTES 16384

/* part i of n of the cache lines of rows [l0, min(l0 + blk, lmax)) of b ([*, hd] floats) asked into L2: a tile asks
   for its next block a part before each query's pass over this one, where all of it at once (256 prefetches in a
   row) stalled the thread until the misses drained */
static inline void attn_prefetch_part(const float* b, int64_t l0, int64_t blk, int64_t lmax, int64_t hd, int64_t i,
                                      int64_t n) {
    const int64_t l1 = l0 + blk < lmax ? l0 + blk : lmax;
    const int64_t lines = l1 > l0 ? (l1 - l0) * hd * (int64_t)sizeof(float) / 64 : 0;
    const char* p = (const char*)(b + l0 * hd);
    for (int64_t o = lines * i / n; o < lines * (i + 1) / n; o++) _mm_prefetch(p + o * 64, _MM_HINT_T1);
}

/* one tile: scores, softmax weights and values, the keys and values read a block of positions at a time for every
   query of the tile; sc: (q1 - q0) x lstride floats */
static void attn_tile(const attn_tile_t* tl, const float* qr, const int64_t* pos, int64_t nh, int64_t group,
                      int64_t hd, const float* kb, const float* vb, float scale, int64_t blk, float* sc,
                      int64_t lstride, float* out) {
    const int64_t nq = tl->q1 - tl->q0;
    int64_t at[ATT_TILE], len[ATT_TILE], lmax = 0;  /* each query's (row, head) index and its row's length */
    for (int64_t i = 0; i < nq; i++) {
        const int64_t q = tl->q0 + i, b = tl->b0 + q / group;
        at[i] = b * nh + tl->kvh * group + q % group;
        len[i] = pos[b] + 1;
        lmax = len[i] > lmax ? len[i] : lmax;
    }
    /* a tile of one row (a decode row) streams its keys and values from memory once, block by block, and waited on
       each block: the next one (after the last block of keys, the first of values) is asked into L2 while this one
       is used. 8 decode rows, 24 layers of 0.5B heads, A/B: 330 positions 5.61-5.76 -> 5.21-5.25 ms with the next
       block asked for all at once before the block's first query, 700 9.87 -> 9.33; spread over the queries: 330
       4.94-5.65 -> 3.89-4.71 ms, 700 9.07-10.89 -> 6.51-7.57. A prompt chunk's tiles share their slot's keys and
       values, which stay in L2 after the first tile: no prefetch there (it cost them 1-5%). */
    const int stream = nq <= group;
    for (int64_t l0 = 0; l0 < lmax; l0 += blk) {
        for (int64_t i = 0; i < nq; i++) {
            if (stream) {
                if (l0 + blk < lmax) attn_prefetch_part(kb, l0 + blk, blk, lmax, hd, i, nq);
                else attn_prefetch_part(vb, 0, blk, lmax, hd, i, nq);
            }
            const int64_t l1 = l0 + blk < len[i] ? l0 + blk : len[i];
            if (l1 > l0) attn_scores(qr + at[i] * hd, kb, l0, l1, hd, sc + i * lstride);
        }
    }
    float inv[ATT_TILE];
    for (int64_t i = 0; i < nq; i++) inv[i] = 1.f / attn_softmax_weights(sc + i * lstride, len[i], scale);
    for (int64_t l0 = 0; l0 < lmax; l0 += blk) {
        for (int64_t i = 0; i < nq; i++) {
            if (stream) attn_prefetch_part(vb, l0 + blk, blk, lmax, hd, i, nq);
            const int64_t l1 = l0 + blk < len[i] ? l0 + blk : len[i];
            if (l1 > l0)
                attn_values(sc + i * lstride, vb, l0, l1, hd, l0 == 0, l1 == len[i], inv[i], out + at[i] * hd);
        }
    }
}

/* Decode attention for B sequences, one new token each:
   qkv [B, (nh + 2 nkv) hd] (biases added); RoPE at pos[b] on q and k (cos/sin tables [*, hd]);
   k and v written into kc/vc[slot[b], kv head, pos[b], :] (cache [max_batch, nkv, max_len, hd]
   float32); out[b, h] = softmax(q k^T / sqrt(hd)) v over cache positions 0..pos[b] (grouped-query:
   query head h reads kv head h / (nh / nkv)). out [B, nh hd]. 0, or -1 (out of memory).
   Every row's key/value is written before any row attends: consecutive rows of one slot (a prompt chunk riding a
   decode step) see the earlier ones, as causal attention.
   The work goes in tiles (attn_tile_t), handed out dynamically: the query heads of a kv head, of one row or of
   consecutive rows of one slot, read its keys and values a block at a time (once a block for the tile, where each
   query head read them all from L2 itself; 0.5B heads, one layer, A/B: 7 decode rows at 330 + a 57-row chunk at 128
   0.49 -> 0.36 ms, 8 rows at 700 0.25 -> 0.19, a 64-row chunk at 1,500 4.1 -> 2.6); rows of very different lengths
   (one long context beside short ones) still spread over the threads, and tiles shrink when there are too few of
   them for every thread. */
int dq_attn_decode(const float* qkv, int64_t B, int64_t nh, int64_t nkv, int64_t hd, const int64_t* slot,
                   const int64_t* pos, const float* cos_t, const float* sin_t, float* kc, float* vc,
                   int64_t max_len, float* out, int nthreads) {
    const int64_t stride = (nh + 2 * nkv) * hd, group = nh / nkv;
    int64_t lmax = 0;
    for (int64_t b = 0; b < B; b++) lmax = pos[b] + 1 > lmax ? pos[b] + 1 : lmax;
    float* qr = (float*)malloc(sizeof(float) * (size_t)(B * nh * hd));
    if (!qr) return -1;
    for (int64_t b = 0; b < B; b++) {
        const float* row = qkv + b * stride;
        const float* c = cos_t + pos[b] * hd;
        const float* s = sin_t + pos[b] * hd;
        for (int64_t h = 0; h < nh; h++) rope_head(row + h * hd, c, s, hd, qr + (b * nh + h) * hd);
        for (int64_t h = 0; h < nkv; h++) {
            const int64_t at = ((slot[b] * nkv + h) * max_len + pos[b]) * hd;
            rope_head(row + (nh + h) * hd, c, s, hd, kc + at);
            memcpy(vc + at, row + (nh + nkv + h) * hd, sizeof(float) * (size_t)hd);
        }
    }
    /* query heads a tile: whole rows' groups up to ATT_TILE; fewer where the tiles would not reach every thread */
    const int nt = nthreads > 0 ? nthreads : 1;
    int64_t tq = group <= ATT_TILE ? ATT_TILE / group * group : ATT_TILE;
    if (B * nh / tq < nt) tq = B * nh / nt > 0 ? B * nh / nt : 1;
    /* (at most one tile per query head: B nh) */
    attn_tile_t* tiles = (attn_tile_t*)malloc(sizeof(attn_tile_t) * (size_t)(B * nh));
    if (!tiles) {
        free(qr);
        return -1;
    }
    int64_t ntiles = 0;
    for (int64_t b0 = 0, b1; b0 < B; b0 = b1) {
        for (b1 = b0 + 1; b1 < B && slot[b1] == slot[b0]; b1++) {}
        const int64_t nq = (b1 - b0) * group;
        for (int64_t kvh = 0; kvh < nkv; kvh++)
            for (int64_t q0 = 0; q0 < nq; q0 += tq)
                tiles[ntiles++] = (attn_tile_t){b0, q0, q0 + tq < nq ? q0 + tq : nq, kvh};
    }
    const float scale = 1.f / sqrtf((float)hd);
    int64_t blk = (ATT_BLOCK_BYTES / (int64_t)sizeof(float) / hd) & ~(int64_t)7;
    blk = blk < 8 ? 8 : blk;
    const int64_t lstride = (lmax + 15) & ~(int64_t)15;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* a tile's scores per thread: memory independent of the batch (a prompt chunk's rows ride here too) */
        float* sc = (float*)malloc(sizeof(float) * (size_t)(tq * lstride));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntiles; i++) {
            if (!sc) continue;
            const attn_tile_t* tl = tiles + i;
            const int64_t base = (slot[tl->b0] * nkv + tl->kvh) * max_len * hd;
            attn_tile(tl, qr, pos, nh, group, hd, kc + base, vc + base, scale, blk, sc, lstride, out);
        }
        free(sc);
    }
    free(tiles);
    free(qr);
    return failed ? -1 : 0;
}


/* h[m, i] = silu(gu[m, i]) * gu[m, I + i] (gu = [gate; up] per row), silu(g) = g / (1 + exp(-g)).
   I % 8 == 0 (checked by the caller). Block.decode_fused calls it too: both decode paths agree bit for bit. */
void dq_silu_mul(const float* gu, int64_t M, int64_t I, float* h, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * I >= 32768)
    for (int64_t m = 0; m < M; m++) {
        const float* g = gu + m * 2 * I;
        const float* u = g + I;
        float* o = h + m * I;
        for (int64_t i = 0; i < I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                                  _mm256_loadu_ps(u + i)));
        }
    }
}

#include "sample_rows.h"  /* dq_sample_rows: a step's rows of logits -> max, argmax, plain-temperature draws */

/* One quantized linear of a decode block, as the model holds it (decode_blocks._Linear mirrors this). */
typedef struct {
    const void* w;      /* int8 [N, K], or int4 [N, K/2] in the layout above */
    const void* s;      /* int8: float32 [N]; int4: bfloat16 [N, K/G] */
    const void* z;      /* int4: bfloat16 [N, K/G]; int8: NULL */
    const int32_t* wsum; /* int8: the block sums [N, K/blk] (dq_w8_block_sums), or NULL; int4: NULL */
    const float* bias;  /* [N] float32, or NULL */
    int64_t N, K;
    int64_t blk;        /* int8: the activation block B; int4: the group G */
    int64_t bits;       /* 8 or 4 */
} dq_linear_t;

/* One decoder block: pre-norm attention and SwiGLU MLP (the model's Block.decode_fused; decode_blocks._Block) */
typedef struct {
    dq_linear_t qkv, o, gate_up, down;
    const float* attn_norm;
    const float* mlp_norm;
    float attn_eps, mlp_eps;
} dq_block_t;

static int run_linear(const dq_linear_t* L, const float* x, int64_t M, float* y, int nthreads, const float* norm_w,
                      float eps, int accumulate) {
    if (L->bits == 8)
        return dq_linear_w8(x, M, L->K, L->blk, (const int8_t*)L->w, (const float*)L->s, L->wsum, L->bias, L->N, y,
                            nthreads, norm_w, eps, accumulate);
    if (L->bits == 4)
        return dq_linear_w4(x, M, L->K, L->blk, (const uint8_t*)L->w, (const uint16_t*)L->s, (const uint16_t*)L->z,
                            L->bias, L->N, y, nthreads, norm_w, eps, accumulate);
    return -1;
}

/* A whole decode step's decoder blocks in one call: x [M, C] float32 (the residual stream, updated in place);
   block i reads and writes kc[i]/vc[i] ([max_batch, nkv, max_len, hd] float32) at slot[m], pos[m], as
   dq_attn_decode. The same kernels, in the same order, as the model's per-layer calls, without a return to the
   interpreter between them (at one token a step that return cost ~3 ms of a 15 ms 0.5B step). The caller has
   checked every shape, slot and position (decode_blocks.DecodeBlocks). 0, or -1 (out of memory / bad block). */
int dq_decode_blocks(float* x, int64_t M, const dq_block_t* blocks, int64_t n_blocks, float* const* kc,
                     float* const* vc, int64_t max_len, int64_t nh, int64_t nkv, int64_t hd, const int64_t* slot,
                     const int64_t* pos, const float* cos_t, const float* sin_t, int nthreads) {
    if (n_blocks <= 0) return 0;
    const int64_t nqkv = blocks[0].qkv.N, I = blocks[0].down.K;
    float* buf = (float*)malloc(sizeof(float) * (size_t)(M * (nqkv + nh * hd + 3 * I)));
    if (!buf) return -1;
    float *qkv = buf, *att = qkv + M * nqkv, *gu = att + M * nh * hd, *h = gu + M * 2 * I;
    int rc = 0;
    for (int64_t i = 0; i < n_blocks && rc == 0; i++) {
        const dq_block_t* b = blocks + i;
        rc = run_linear(&b->qkv, x, M, qkv, nthreads, b->attn_norm, b->attn_eps, 0);
        if (rc == 0) rc = dq_attn_decode(qkv, M, nh, nkv, hd, slot, pos, cos_t, sin_t, kc[i], vc[i], max_len, att, nthreads);
        if (rc == 0) rc = run_linear(&b->o, att, M, x, nthreads, NULL, 0.f, 1);
        if (rc == 0) rc = run_linear(&b->gate_up, x, M, gu, nthreads, b->mlp_norm, b->mlp_eps, 0);
        if (rc == 0) dq_silu_mul(gu, M, I, h, nthreads);
        if (rc == 0) rc = run_linear(&b->down, h, M, x, nthreads, NULL, 0.f, 1);
    }
    free(buf);
    return rc;
}

#else /* DQ_KERNELS_DEFINED: the body, compiled once per instruction set ------------------------- */

#if DQ_VNNI
/* acc (int32 x 8) += 4-byte dot products of u (unsigned) and s (signed): one instruction (VEX-encoded
   AVX-VNNI, or the same instruction EVEX-encoded on AVX512-VNNI CPUs, which may lack AVX-VNNI) */
#if DQ_VNNI == 2
#define DPBUSD256 _mm256_dpbusd_epi32
#else
#define DPBUSD256 _mm256_dpbusd_avx_epi32
#endif
#define DOT_ADD(acc, u, s) DPBUSD256((acc), (u), (s))
/* int4 pairs: accumulated straight into int32, no int16 stage to widen */
#define PAIR_ADD(acc, u0, s0, u1, s1) DPBUSD256(DPBUSD256((acc), (u0), (s0)), (u1), (s1))
#define ONE_ADD(acc, u, s) DPBUSD256((acc), (u), (s))
#define PAIR_WIDEN(acc) (acc)
#else
#define DOT_ADD(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#define PAIR_ADD(acc, u0, s0, u1, s1) \
    _mm256_add_epi16((acc), _mm256_add_epi16(_mm256_maddubs_epi16((u0), (s0)), _mm256_maddubs_epi16((u1), (s1))))
#define ONE_ADD(acc, u, s) _mm256_add_epi16((acc), _mm256_maddubs_epi16((u), (s)))
#define PAIR_WIDEN(acc) _mm256_madd_epi16((acc), _mm256_set1_epi16(1))
#endif

/* One weight row against mt (1..4) activation rows: r[j] = sum_b xs[j, b] * sum_{i in b} w[i] x[j, i], the
   int8 kernels' one float order everywhere (W8_BLOCK_STEP). The weight chunk and its absolute value are loaded once
   per chunk and reused for every row; pf: the same offsets of a later weight row, prefetched into L1 block by block. */
static inline __attribute__((always_inline)) void SFX(w8_tile)(const int8_t* wr, const int8_t* xq, const float* xs,
                                                          int64_t K, int64_t B, int64_t nb, int mt, float* r,
                                                          const int8_t* pf) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t o = b * B; o < (b + 1) * B; o += 64) _mm_prefetch((const char*)(pf + o), _MM_HINT_T0);
        __m256i ai[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                         _mm256_setzero_si256()};
        for (int64_t i = b * B; i < (b + 1) * B; i += 32) {
            const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + i));
            const __m256i ua = _mm256_sign_epi8(wv, wv);  /* |w| as unsigned */
            for (int j = 0; j < mt; j++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + j * K + i));
                ai[j] = DOT_ADD(ai[j], ua, _mm256_sign_epi8(xv, wv));  /* |w| . x * sign(w) */
            }
        }
        for (int j = 0; j < mt; j++) acc[j] = W8_BLOCK_STEP(hsum_epi32(ai[j]), xs[j * nb + b], acc[j]);
    }
    for (int j = 0; j < mt; j++) r[j] = acc[j];
}

/* One weight row against one activation row (a single-stream decode step): w8_tile's blocks eight at a time, their
   exact integer sums gathered into one register by a tree of horizontal adds where w8_tile reduces each block
   alone, then the same float steps (W8_BLOCK_STEP) in the same order (on a Zen 1: the 0.5B's int8 lm_head at one
   row 3-9% faster, the same bits) */
static inline __attribute__((always_inline)) float SFX(w8_row)(const int8_t* wr, const int8_t* xq, const float* xs,
                                                          int64_t B, int64_t nb, const int8_t* pf) {
    float acc = 0.f;
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int64_t bn = nb - b0 < 8 ? nb - b0 : 8;
        __m256i v[8];
        for (int64_t t = 0; t < 8; t++) {
            __m256i ai = _mm256_setzero_si256();
            if (t < bn) {
                const int64_t b = b0 + t;
                for (int64_t o = b * B; o < (b + 1) * B; o += 64) _mm_prefetch((const char*)(pf + o), _MM_HINT_T0);
                for (int64_t i = b * B; i < (b + 1) * B; i += 32) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + i));
                    const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + i));
                    ai = DOT_ADD(ai, _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                }
            }
            v[t] = ai;
        }
        /* lanes 0..3 of q4: blocks 0..3's sums over their 8 lanes' low halves, lanes 4..7 the high halves */
        const __m256i q4 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        const __m256i q8 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(q4, q8, 0x20),
                                              _mm256_permute2x128_si256(q4, q8, 0x31));
        int32_t si[8];
        _mm256_storeu_si256((__m256i*)si, sums);
        for (int64_t t = 0; t < bn; t++) acc = W8_BLOCK_STEP(si[t], xs[b0 + t], acc);
    }
    return acc;
}

/* int4: r[j] = sum_g xs[j, g] (s_g sum_{i in g} c_i q[j, i] + (z_g - 8 s_g) qsum[j, g]).
   AVX2: codes are 0..15, so a maddubs pair sum is at most 2 * 15 * 127 = 3810 and up to 8 of them
   add up in int16 without overflow: one widening madd per group instead of one per 32 values. */
static inline __attribute__((always_inline)) void SFX(w4_tile)(const uint8_t* wr, const int8_t* xq, const float* xs,
                                                          const int32_t* xqs, const float* sg, const float* cg,
                                                          int64_t K, int64_t G, int64_t ng, int mt, float* r,
                                                          const uint8_t* pf) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 accf[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float extra[4] = {0.f, 0.f, 0.f, 0.f};
    const uint64_t gb = (uint64_t)G / 2;  /* a group's bytes */
    for (int64_t g = 0; g < ng; g++) {
        const uint64_t g0 = (uint64_t)g * gb;
        w4_prefetch_group(pf, g0, gb);
        __m256i a16[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        if (G >= 64) {
            const uint8_t* wb = wr + g0;
            for (int64_t i = g * G; i < (g + 1) * G; i += 64, wb += 32) {
                const __m256i bytes = _mm256_loadu_si256((const __m256i*)wb);
                const __m256i lo = _mm256_and_si256(bytes, low4);                        /* values i..i+31 */
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);  /* i+32..i+63 */
                for (int j = 0; j < mt; j++) {
                    const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + j * K + i));
                    const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + j * K + i + 32));
                    a16[j] = PAIR_ADD(a16[j], lo, x0, hi, x1);
                }
            }
        } else { /* G == 32: the group is one half of a 64-value block */
            const int64_t i = g * G;
            const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wr + (i / 64) * 32));
            const __m256i c = (i % 64) ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4)
                                       : _mm256_and_si256(bytes, low4);
            for (int j = 0; j < mt; j++)
                a16[j] = ONE_ADD(a16[j], c, _mm256_loadu_si256((const __m256i*)(xq + j * K + i)));
        }
        for (int j = 0; j < mt; j++) {
            const float d = xs[j * ng + g];
            const __m256i ai = PAIR_WIDEN(a16[j]);
            accf[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(d * sg[g]), accf[j]);
            extra[j] += d * (float)xqs[j * ng + g] * cg[g];
        }
    }
    for (int j = 0; j < mt; j++) r[j] = hsum_ps(accf[j]) + extra[j];
}

/* One weight row's per-group terms for SFX(w4_row): sc[g] = xs[g] s[g] and ex[g] = dx[g] (z[g] - 8 s[g]) (dx = xs *
   code sum, per call), 8 groups at a time: the products w4_tile takes inside its group loop, so the same values */
static inline __attribute__((always_inline)) void SFX(w4_row_scales)(const uint16_t* s, const uint16_t* z,
                                                                const float* xs, const float* dx, int64_t ng,
                                                                float* sc, float* ex) {
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
            _mm_loadu_si128((const __m128i*)(s + g))), 16));
        const __m256 zv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
            _mm_loadu_si128((const __m128i*)(z + g))), 16));
        const __m256 cv = _mm256_sub_ps(zv, _mm256_mul_ps(_mm256_set1_ps(8.f), sv));
        _mm256_storeu_ps(sc + g, _mm256_mul_ps(_mm256_loadu_ps(xs + g), sv));
        _mm256_storeu_ps(ex + g, _mm256_mul_ps(_mm256_loadu_ps(dx + g), cv));
    }
    for (; g < ng; g++) {
        const float sg = bf16_to_f32(s[g]);
        sc[g] = xs[g] * sg;
        ex[g] = dx[g] * (bf16_to_f32(z[g]) - 8.f * sg);
    }
}

/* One activation row (a single-stream decode step), G % 64 == 0, with the row's per-group terms precomputed
   (SFX(w4_row_scales)): a broadcast and an FMA per group where w4_tile converts and multiplies scalars (on a Zen 1,
   19-23% less time a 0.5B layer's int4 linears at one row), the same float steps in the same order */
static inline __attribute__((always_inline)) float SFX(w4_row)(const uint8_t* wr, const int8_t* xq, const float* sc,
                                                          const float* ex, int64_t G, int64_t ng, const uint8_t* pf) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float e = 0.f;
    const uint64_t gb = (uint64_t)G / 2;
    for (int64_t g = 0; g < ng; g++) {
        const uint64_t g0 = (uint64_t)g * gb;
        w4_prefetch_group(pf, g0, gb);
        const uint8_t* wb = wr + g0;
        const int8_t* xg = xq + g * G;
        __m256i a16 = _mm256_setzero_si256();
        for (int64_t i = 0; i < G; i += 64, wb += 32) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i*)wb);
            const __m256i lo = _mm256_and_si256(bytes, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            a16 = PAIR_ADD(a16, lo, _mm256_loadu_si256((const __m256i*)(xg + i)), hi,
                           _mm256_loadu_si256((const __m256i*)(xg + i + 32)));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PAIR_WIDEN(a16)), _mm256_set1_ps(sc[g]), acc);
        e += ex[g];
    }
    return hsum_ps(acc) + e;
}

/* dq_linear_w8 on this instruction set */
static int SFX(linear_w8)(const float* x, int64_t M, int64_t K, int64_t B, const int8_t* w, const float* ws,
                 const float* bias, int64_t N, float* y, int nthreads, const float* norm_w, float eps,
                 int accumulate) {
    if (K <= 0 || B <= 0 || B % 32 != 0 || K % B != 0) return -1;
    const int64_t nb = K / B;
    scratch_t sc;
    if (scratch_init(&sc, M, K, nb) != 0) return -1;
    int8_t* xq = sc.q;
    float* xs = sc.scale;
    quantize_rows(x, M, K, B, norm_w, eps, sc.tmp, xq, xs, sc.qsum, nthreads);
    const int64_t ahead = prefetch_rows(K);
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wr = w + n * K;
        const int8_t* pf = w + (n + ahead < N ? n + ahead : n) * K;
        if (M == 1) {
            w8_out(y + n, SFX(w8_row)(wr, xq, xs, B, nb, pf), ws, bias, n, accumulate);
            continue;
        }
        float r[4];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = M - m0 < 4 ? M - m0 : 4;
            const int8_t* xr = xq + m0 * K;
            const float* sr = xs + m0 * nb;
            switch (mt) {  /* constant tile sizes: the compiler keeps each tile's accumulators in registers */
                case 4: SFX(w8_tile)(wr, xr, sr, K, B, nb, 4, r, pf); break;
                case 3: SFX(w8_tile)(wr, xr, sr, K, B, nb, 3, r, pf); break;
                case 2: SFX(w8_tile)(wr, xr, sr, K, B, nb, 2, r, pf); break;
                default: SFX(w8_tile)(wr, xr, sr, K, B, nb, 1, r, pf); break;
            }
            for (int64_t j = 0; j < mt; j++) w8_out(y + (m0 + j) * N + n, r[j], ws, bias, n, accumulate);
        }
    }
    free(sc.buf);
    return 0;
}

/* dq_linear_w4 on this instruction set */
static int SFX(linear_w4)(const float* x, int64_t M, int64_t K, int64_t G, const uint8_t* w, const uint16_t* s,
                 const uint16_t* z, const float* bias, int64_t N, float* y, int nthreads, const float* norm_w,
                 float eps, int accumulate) {
    /* groups of 32, or whole 64-value blocks (a group never splits a block unevenly); <= 256 for int16 */
    if (K <= 0 || G <= 0 || (G != 32 && G % 64 != 0) || K % G != 0 || K % 64 != 0 || G > 256) return -1;
    const int64_t ng = K / G;
    scratch_t sc;
    if (scratch_init(&sc, M, K, ng) != 0) return -1;
    int8_t* xq = sc.q;
    float* xs = sc.scale;
    int32_t* xsum = sc.qsum;
    quantize_rows(x, M, K, G, norm_w, eps, sc.tmp, xq, xs, xsum, nthreads);
    const int64_t ahead = prefetch_rows(K / 2);
    /* one row, G % 64 == 0: dx[g] = xs[g] * (code sum of group g), once per call, for SFX(w4_row) */
    const int one_row = M == 1 && G % 64 == 0;
    float dx[one_row ? ng : 1];
    if (one_row)
        for (int64_t g = 0; g < ng; g++) dx[g] = xs[g] * (float)xsum[g];
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wr = w + n * (K / 2);
        const uint8_t* pf = w + (n + ahead < N ? n + ahead : n) * (K / 2);
        _mm_prefetch((const char*)(s + (n + ahead < N ? n + ahead : n) * ng), _MM_HINT_T0);
        _mm_prefetch((const char*)(z + (n + ahead < N ? n + ahead : n) * ng), _MM_HINT_T0);
        if (one_row) {
            float rsc[ng], rex[ng];
            SFX(w4_row_scales)(s + n * ng, z + n * ng, xs, dx, ng, rsc, rex);
            /* the usual group of 128 as a constant: its inlined group loop without index arithmetic (3-6% less
               time at one row on a Zen 1) */
            out_store(y + n, G == 128 ? SFX(w4_row)(wr, xq, rsc, rex, 128, ng, pf)
                                      : SFX(w4_row)(wr, xq, rsc, rex, G, ng, pf), bias, n, accumulate);
            continue;
        }
        float sg[ng > 0 ? ng : 1], cg[ng > 0 ? ng : 1];
        for (int64_t g = 0; g < ng; g++) {
            sg[g] = bf16_to_f32(s[n * ng + g]);
            cg[g] = bf16_to_f32(z[n * ng + g]) - 8.f * sg[g];  /* (z - 8 s): the zero-point term */
        }
        float r[4];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = M - m0 < 4 ? M - m0 : 4;
            const int8_t* xr = xq + m0 * K;
            const float* xsr = xs + m0 * ng;
            const int32_t* xqs = xsum + m0 * ng;
            switch (mt) {
                case 4: SFX(w4_tile)(wr, xr, xsr, xqs, sg, cg, K, G, ng, 4, r, pf); break;
                case 3: SFX(w4_tile)(wr, xr, xsr, xqs, sg, cg, K, G, ng, 3, r, pf); break;
                case 2: SFX(w4_tile)(wr, xr, xsr, xqs, sg, cg, K, G, ng, 2, r, pf); break;
                default: SFX(w4_tile)(wr, xr, xsr, xqs, sg, cg, K, G, ng, 1, r, pf); break;
            }
            for (int64_t j = 0; j < mt; j++) out_store(y + (m0 + j) * N + n, r[j], bias, n, accumulate);
        }
    }
    free(sc.buf);
    return 0;
}

#undef DPBUSD256
#undef DOT_ADD
#undef PAIR_ADD
#undef ONE_ADD
#undef PAIR_WIDEN
#endif /* DQ_KERNELS_DEFINED */
