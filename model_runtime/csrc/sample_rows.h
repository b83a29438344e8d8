/*
 * A decode step's rows of logits -> each row's largest logit and its index, and, for the rows sampled at a plain
 * temperature (no top-k / top-p / min-p, no penalties: the API's defaults, what a load client such as guidellm
 * sends), the drawn token, in one call over every row on every thread (included by dq_kernels.c; uses its exp_ps).
 *
 * Why: the engine took each row's max with torch (one op over the batch, ~1.1 ms for 8 rows of 151,936 logits on
 * the 2-vCPU VM) and then sampled row by row on one thread (softmax, block sums, a draw: ~0.3 ms a row), ~3.6 ms of
 * an ~30 ms 8-row decode step. Here a row is read twice (its max, then exp and block sums) and rows run in parallel.
 *
 * The draw is sampling._draw's for p = softmax(row / temperature) and the same uniform number u (drawn by the
 * caller from the request's generator): the block of SAMPLE_BLOCK values whose cumulative float64 sum first
 * exceeds u * total, then the value within it; a value of probability 0 (a -inf logit, or one below exp's range)
 * is never chosen. The probabilities are computed here (exp_ps, (x - max) / t), not by torch's softmax, so they
 * may differ from _sample's in the last bits: the same seed draws the same tokens run after run, and a draw can
 * differ from _sample's only where u falls within rounding of a boundary.
 */
#define SAMPLE_BLOCK 128  /* values per block of the draw's first step (a multiple of 8) */

/* exp((x - mx) * it) of 8 values, 0 where that is below exp_ps's range (a -inf logit has probability 0) */
static inline __m256 sample_exp8(__m256 x, __m256 mx, __m256 it) {
    const __m256 a = _mm256_mul_ps(_mm256_sub_ps(x, mx), it);
    return _mm256_and_ps(exp_ps(a), _mm256_cmp_ps(a, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
}

/* values v0..v0+7 of row x (len V), the ones past V as -inf */
static inline __m256 sample_load8(const float* x, int64_t v0, int64_t V) {
    if (v0 + 8 <= V) return _mm256_loadu_ps(x + v0);
    float tmp[8];
    for (int i = 0; i < 8; i++) tmp[i] = v0 + i < V ? x[v0 + i] : -INFINITY;
    return _mm256_loadu_ps(tmp);
}

/* the largest value of x [V] and the first index holding it; NaN if any value is NaN */
static void sample_row_max(const float* x, int64_t V, float* maxv, int64_t* argmax) {
    __m256 best = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    __m256i at = _mm256_set1_epi32(0), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    for (int64_t v = 0; v < V; v += 8) {
        const __m256 xv = sample_load8(x, v, V);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
        const __m256 gt = _mm256_cmp_ps(xv, best, _CMP_GT_OQ);  /* strictly greater: each lane keeps its first */
        best = _mm256_blendv_ps(best, xv, gt);
        at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), gt));
        idx = _mm256_add_epi32(idx, step);
    }
    float b[8];
    int32_t a[8];
    _mm256_storeu_ps(b, best);
    _mm256_storeu_si256((__m256i*)a, at);
    float m = b[0];
    for (int i = 1; i < 8; i++) m = b[i] > m ? b[i] : m;
    int64_t first = V;  /* the first index over the lanes that hold the max */
    for (int i = 0; i < 8; i++)
        if (b[i] == m && a[i] < first) first = a[i];
    if (first == V) first = 0;  /* every value -inf */
    *maxv = _mm256_movemask_ps(nan) ? NAN : m;
    *argmax = first;
}

/* index drawn from row x [V] with probability exp((x - mx) / t) / sum, at u in [0, 1); sums: scratch of
   ceil(V / SAMPLE_BLOCK) doubles */
static int64_t sample_row_draw(const float* x, int64_t V, float mx, float t, double u, double* sums) {
    const __m256 vmx = _mm256_set1_ps(mx), it = _mm256_set1_ps(1.f / t);
    const int64_t nblk = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    double total = 0.0;
    for (int64_t b = 0; b < nblk; b++) {
        __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
        for (int64_t v = b * SAMPLE_BLOCK; v < (b + 1) * SAMPLE_BLOCK && v < V; v += 8) {
            const __m256 e = sample_exp8(sample_load8(x, v, V), vmx, it);
            s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        }
        double d[4];
        _mm256_storeu_pd(d, _mm256_add_pd(s0, s1));
        sums[b] = (d[0] + d[1]) + (d[2] + d[3]);
        total += sums[b];
    }
    const double target = u * total;
    int64_t blk = nblk - 1;
    double before = 0.0;
    for (int64_t b = 0; b < nblk; b++) {
        if (before + sums[b] > target) {
            blk = b;
            break;
        }
        if (b < nblk - 1) before += sums[b];
    }
    /* within the block: the first value whose running sum passes what is left of the target */
    const int64_t v0 = blk * SAMPLE_BLOCK, v1 = v0 + SAMPLE_BLOCK < V ? v0 + SAMPLE_BLOCK : V;
    float e[SAMPLE_BLOCK];
    for (int64_t v = v0; v < v1; v += 8) _mm256_storeu_ps(e + (v - v0), sample_exp8(sample_load8(x, v, V), vmx, it));
    const double within = target - before;
    double run = 0.0;
    int64_t choice = v1 - 1;
    for (int64_t v = v0; v < v1; v++) {
        run += e[v - v0];
        if (run > within) {
            choice = v;
            break;
        }
    }
    if (e[choice - v0] > 0.f) return choice;
    /* rounding left the number on a value of probability 0: the nearest possible one before it, else after it */
    for (int64_t v = choice - 1; v >= v0; v--)
        if (e[v - v0] > 0.f) return v;
    for (int64_t b = blk - 1; b >= 0; b--)
        if (sums[b] > 0.0)
            for (int64_t v = (b + 1) * SAMPLE_BLOCK - 1; v >= b * SAMPLE_BLOCK; v--)
                if (_mm256_cvtss_f32(sample_exp8(_mm256_set1_ps(x[v]), vmx, it)) > 0.f) return v;
    for (int64_t v = choice + 1; v < V; v++)
        if (_mm256_cvtss_f32(sample_exp8(_mm256_set1_ps(x[v]), vmx, it)) > 0.f) return v;
    return choice;  /* (unreachable: the max itself has probability 1 / total > 0) */
}

/* logits [B, V] float32 -> maxv [B], argmax [B] (each row's largest logit, NaN if the row holds one, and its
   first index); for each row with temp[b] > 0 and a finite max, choice[b] = a token drawn at u[b] from
   softmax(row / temp[b]), else -1. Rows in parallel. 0, or -1 (out of memory). */
int dq_sample_rows(const float* logits, int64_t B, int64_t V, const float* temp, const double* u, float* maxv,
                   int64_t* argmax, int64_t* choice, int nthreads) {
    if (B <= 0 || V <= 0) return 0;
    int failed = 0;
#pragma omp parallel num_threads(B > 1 ? nthreads : 1)
    {
        double* sums = (double*)malloc(sizeof(double) * (size_t)((V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK));
        if (!sums) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            const float* x = logits + b * V;
            sample_row_max(x, V, maxv + b, argmax + b);
            choice[b] = -1;
            if (sums && temp[b] > 0.f && isfinite(maxv[b])) choice[b] = sample_row_draw(x, V, maxv[b], temp[b], u[b], sums);
        }
        free(sums);
    }
    return failed ? -1 : 0;
}
