/* kvcli's decode-step attention on CPU (AVX-512 with BF16 dot products): one new token's query
   heads over a layer's KV heads, each KV head its own number of entries (a packed layer) or all
   the same (a dense one), in one call.

   out[i] = sum_j softmax_j(scale * q[i] . k_{h,j}) v_{h,j}, for query head i of KV head h = i / group,
   over the n_h entries of head h. The query, keys, values and output are bfloat16; the products
   q . k are summed in float32 (exact bf16 x bf16 products), the softmax is float32, its weights
   are rounded to bfloat16 for the weighted sum of the values, which is summed in float32 and
   rounded once to bfloat16.

   Why: a decode step's attention is a few hundred entries per KV head, and torch's SDPA costs about
   as much per call as the work itself; a dense layer makes one call, a packed layer made one per
   KV head (kvcli/decode_kernel.py, docs/results.md "Decode with unequal heads").

   Each KV head's rows are `key_stride` (`value_stride`) elements apart, from row `starts[h]` of
   `keys` (`values`). On torch's OpenMP threads, when the call is large enough to pay for them
   (PARALLEL_FROM), each thread reads a share of every KV head's rows for all its query heads, and
   the shares' softmax sums are merged at the end (as flash-decoding splits a long cache). */

#include <immintrin.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM 512
#define BLOCK 16 /* keys per block: one vector of logits */
#define EMPTY (-1.0f) /* a share's sum of weights where it has no rows (a real sum is >= 0, or NaN) */
/* Products (entries x group x dim) from which a call's rows are shared between threads:
   on this project's 2-core machine two threads gained from ~70 entries per KV head at the default
   model's shape (7 query heads per KV head, dim 64), and lost ~0.4 us below. */
#define PARALLEL_FROM (1 << 16)

/* The 16 x 16 32-bit words of r transposed in place: r[c] becomes word c of every r[0..15]. */
static inline void transpose16(__m512i *r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: words 0-1 and 2-3 of rows 2i, 2i + 1, interleaved */
        t[2 * i] = _mm512_unpacklo_ps(_mm512_castsi512_ps(r[2 * i]), _mm512_castsi512_ps(r[2 * i + 1]));
        t[2 * i + 1] = _mm512_unpackhi_ps(_mm512_castsi512_ps(r[2 * i]), _mm512_castsi512_ps(r[2 * i + 1]));
    }
    for (int i = 0; i < 4; i++) { /* u[4i + c], lane L: rows 4i .. 4i + 3 of word 4L + c */
        const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; c++) { /* the four lanes of each word brought together */
        t[c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
        t[4 + c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
        t[8 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
        r[8 + c] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd));
        r[4 + c] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88));
        r[12 + c] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd));
    }
}

/* e^x for x <= 0 (a logit minus its row's largest), float32: Cephes' expf reduction and polynomial;
   0 below -87 (and for -inf), NaN for NaN */
static inline __m512 exp_nonpositive(__m512 x) {
    const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ); /* NaN: kept, stays NaN */
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* x second: a NaN stays NaN (max returns its second operand) */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(p, n));
}

static inline void store_bf16(uint16_t *out, float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {
        bits |= 0x00400000u; /* a NaN stays a (quiet) NaN */
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    }
    *out = (uint16_t)(bits >> 16);
}

/* Scaled logits of `nq` (1-4) query heads `q[0..nq-1]` (dim / 2 words each) for a block of 16 keys
   given transposed (`kt[p]`: word p, dims 2p and 2p + 1, of each key): one vector of 16 sums per
   query, no horizontal sums; each query's products in `split` sums so that the dot products overlap. */
static inline __attribute__((always_inline)) void logits(const uint32_t *const *q, const int nq, const int split,
                                                        const __m512i *kt, int words, float scale, float *const *into) {
    __m512 sums[8];
    for (int i = 0; i < nq * split; i++) {
        sums[i] = _mm512_setzero_ps();
    }
    for (int p = 0; p < words; p += split) {
        for (int s = 0; s < split; s++) {
            const __m512bh k = (__m512bh)kt[p + s];
            for (int j = 0; j < nq; j++) {
                sums[j * split + s] = _mm512_dpbf16_ps(sums[j * split + s], (__m512bh)_mm512_set1_epi32((int)q[j][p + s]), k);
            }
        }
    }
    for (int j = 0; j < nq; j++) {
        __m512 total = sums[j * split];
        for (int s = 1; s < split; s++) {
            total = _mm512_add_ps(total, sums[j * split + s]);
        }
        _mm512_storeu_ps(into[j], _mm512_mul_ps(total, _mm512_set1_ps(scale)));
    }
}

/* `logits` for `nq` queries over `words` words, with the counts of the usual head dims unrolled */
static inline __attribute__((always_inline)) void logits_of(const uint32_t *const *q, int nq, const __m512i *kt, int words,
                                                           float scale, float *const *into) {
#define LOGITS_FOR(WORDS)                                                                                                   \
    switch (nq) {                                                                                                           \
    case 4: logits(q, 4, 1, kt, WORDS, scale, into); break;                                                                \
    case 3: logits(q, 3, 2, kt, WORDS, scale, into); break;                                                                \
    case 2: logits(q, 2, 2, kt, WORDS, scale, into); break;                                                                \
    default: logits(q, 1, 4, kt, WORDS, scale, into); break;                                                               \
    }
    if (words == 32) {
        LOGITS_FOR(32)
    } else if (words == 64) {
        LOGITS_FOR(64)
    } else {
        LOGITS_FOR(words)
    }
#undef LOGITS_FOR
}

/* lane i of the result: the sum of v[i]'s 16 lanes */
static inline __m512 sums16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++) {
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    }
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: that lane's sums of v[4i] .. v[4i+3] */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    }
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* Scaled logits of one query head `q` for m <= 16 key rows as they lie (zeros for the rest of the
   block): where a head has one or two query heads, transposing the block would cost more. */
static inline __attribute__((always_inline)) void row_logits(const uint16_t *q, const uint16_t *rows, int64_t key_stride,
                                                            int chunks, int64_t m, float scale, float *into) {
    __m512 s[BLOCK];
    for (int j = 0; j < BLOCK; j++) {
        s[j] = _mm512_setzero_ps();
    }
    for (int c = 0; c < chunks; c++) {
        const __m512bh qc = (__m512bh)_mm512_loadu_si512(q + 32 * c);
        for (int j = 0; j < m; j++) {
            s[j] = _mm512_dpbf16_ps(s[j], qc, (__m512bh)_mm512_loadu_si512(rows + j * key_stride + 32 * c));
        }
    }
    _mm512_storeu_ps(into, _mm512_mul_ps(sums16(s), _mm512_set1_ps(scale)));
}

/* acc (v_dim floats, in the unpacks' order) += the n_pairs pairs of rows in `pairs`, each pair
   weighted by its two bf16 `weights`; every chunk's sums kept apart so the products overlap */
static inline __attribute__((always_inline)) void weigh_rows(const uint32_t *weights, const __m512i *pairs, int n_pairs,
                                                            int v_chunks, float *acc) {
    __m512 sums[MAX_DIM / 16];
    for (int c = 0; c < 2 * v_chunks; c++) {
        sums[c] = _mm512_loadu_ps(acc + 16 * c);
    }
    for (int k = 0; k < n_pairs; k++) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32((int)weights[k]);
        for (int c = 0; c < 2 * v_chunks; c++) {
            sums[c] = _mm512_dpbf16_ps(sums[c], w, (__m512bh)pairs[k * 2 * v_chunks + c]);
        }
    }
    for (int c = 0; c < 2 * v_chunks; c++) {
        _mm512_storeu_ps(acc + 16 * c, sums[c]);
    }
}

/* One KV head's `group` query heads over its rows lo .. hi - 1 (a thread's share; lo a multiple
   of BLOCK): for each query head g, `part + g * (v_dim + 2)` gets the weighted values (v_dim floats,
   in the unpacks' order, not yet divided), then the largest logit and the sum of the weights (e^(logit
   - largest)); an empty share: -inf and EMPTY. Scratch: `scores` group * (hi - lo + 2 * BLOCK) floats,
   `pairs` 16 * MAX_DIM / 32 vectors. */
static void attend_part(const uint16_t *query, int group, const uint16_t *keys, int64_t key_stride, const uint16_t *values,
                        int64_t value_stride, int64_t lo, int64_t hi, int dim, int v_dim, float scale, float *part,
                        float *scores, __m512i *pairs) {
    const int chunks = dim / 32, v_chunks = v_dim / 32; /* 32 bf16 per vector */
    const int64_t n = hi - lo, row = n + 2 * BLOCK, stats = v_dim + 2;
    for (int g = 0; g < group; g++) {
        memset(part + g * stats, 0, sizeof(float) * v_dim);
        part[g * stats + v_dim] = -__builtin_inff();
        part[g * stats + v_dim + 1] = EMPTY;
    }
    if (n <= 0) {
        return;
    }
    keys += lo * key_stride;
    values += lo * value_stride;
    /* logits, BLOCK keys at a time: with three or more query heads the block is transposed once
       (into `pairs`, free until the values) and read by four query heads at a time */
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t m = n - j0 < BLOCK ? n - j0 : BLOCK;
        if (group < 3) {
            for (int g = 0; g < group; g++) {
                row_logits(query + (int64_t)g * dim, keys + j0 * key_stride, key_stride, chunks, m, scale, scores + g * row + j0);
            }
            continue;
        }
        for (int c = 0; c < chunks; c++) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                r[j] = j < m ? _mm512_loadu_si512(keys + (j0 + j) * key_stride + 32 * c) : _mm512_setzero_si512();
            }
            transpose16(r);
            memcpy(pairs + 16 * c, r, sizeof r);
        }
        for (int g = 0; g < group; g += 4) {
            const uint32_t *q[4] = {0};
            float *into[4] = {0};
            const int nq = group - g < 4 ? group - g : 4;
            for (int k = 0; k < nq; k++) {
                q[k] = (const uint32_t *)(query + (int64_t)(g + k) * dim);
                into[k] = scores + (g + k) * row + j0;
            }
            logits_of(q, nq, pairs, 16 * chunks, scale, into);
        }
    }
    /* softmax per query head, in place, against the share's largest logit; zero weights past n,
       to a whole pair of keys */
    for (int g = 0; g < group; g++) {
        float *p = scores + g * row;
        __m512 top = _mm512_set1_ps(-__builtin_inff());
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            top = _mm512_max_ps(top, _mm512_loadu_ps(p + j));
        }
        const __mmask16 tail = (__mmask16)((1u << (n - j)) - 1u);
        if (j < n) {
            top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, p + j));
        }
        const float most = _mm512_reduce_max_ps(top);
        /* every logit -inf: no weight here (not e^(-inf - -inf)) */
        const __m512 largest = _mm512_set1_ps(most == -__builtin_inff() ? 0.0f : most);
        __m512 total = _mm512_setzero_ps();
        for (j = 0; j + 16 <= n; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + j), largest));
            _mm512_storeu_ps(p + j, e);
            total = _mm512_add_ps(total, e);
        }
        if (j < n) {
            const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + j), largest)));
            _mm512_storeu_ps(p + j, e);
            total = _mm512_add_ps(total, e);
            j += 16;
        }
        _mm512_storeu_ps(p + j, _mm512_setzero_ps());
        part[g * stats + v_dim] = most;
        part[g * stats + v_dim + 1] = _mm512_reduce_add_ps(total);
        /* the weights as bf16 pairs (p_2k, p_2k+1) in place: 32 floats become 16 words */
        uint32_t *words = (uint32_t *)p;
        for (int64_t k = 0; k < n; k += 32) {
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + k + 16), _mm512_loadu_ps(p + k));
            _mm512_storeu_si512(words + k / 2, both);
        }
    }
    /* the weighted values, BLOCK rows at a time: rows 2k and 2k + 1 interleaved once per block
       (their words paired per dim), then two rows per BF16 dot product for every query head */
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t m = n - j0 < BLOCK ? n - j0 : BLOCK;
        const int n_pairs = (int)((m + 1) / 2);
        for (int k = 0; k < n_pairs; k++) {
            const uint16_t *even = values + (j0 + 2 * k) * value_stride;
            for (int c = 0; c < v_chunks; c++) {
                const __m512i a = _mm512_loadu_si512(even + 32 * c);
                const __m512i b = 2 * k + 1 < m ? _mm512_loadu_si512(even + value_stride + 32 * c) : _mm512_setzero_si512();
                pairs[(k * v_chunks + c) * 2] = _mm512_unpacklo_epi16(a, b);
                pairs[(k * v_chunks + c) * 2 + 1] = _mm512_unpackhi_epi16(a, b);
            }
        }
        for (int g = 0; g < group; g++) {
            const uint32_t *weights = (const uint32_t *)(scores + g * row) + j0 / 2;
            float *into = part + g * stats;
            switch (v_chunks) { /* the usual head dims with their sums in registers */
            case 2: weigh_rows(weights, pairs, n_pairs, 2, into); break;
            case 4: weigh_rows(weights, pairs, n_pairs, 4, into); break;
            default: weigh_rows(weights, pairs, n_pairs, v_chunks, into); break;
            }
        }
    }
}

/* A thread's scratch: kept between calls (a decode step's attention runs every layer, every
   token), grown when a longer share needs more (group x (rows + 32) floats, 16 KiB: 3.6 MB for 7
   query heads of a 128K-entry head), freed when the thread ends; `parts`: the calling thread's
   buffer for every thread's partial results. */
struct scratch {
    float *data, *parts;
    size_t floats, part_floats;
};
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_keyed;

static void release(void *mine) {
    struct scratch *held = mine;
    free(held->data);
    free(held->parts);
    free(held);
}

static void make_key(void) {
    scratch_keyed = pthread_key_create(&scratch_key, release) == 0;
}

static struct scratch *scratch_here(void) {
    pthread_once(&scratch_once, make_key);
    if (!scratch_keyed) {
        return NULL;
    }
    struct scratch *held = pthread_getspecific(scratch_key);
    if (held == NULL) {
        held = calloc(1, sizeof *held);
        if (held == NULL || pthread_setspecific(scratch_key, held) != 0) {
            free(held);
            return NULL;
        }
    }
    return held;
}

/* `*buffer` with room for `floats` (64-byte aligned), grown if it has less; NULL when no memory. */
static float *grown(float **buffer, size_t *size, size_t floats) {
    if (floats > *size) {
        free(*buffer);
        *size = 0;
        if (posix_memalign((void **)buffer, 64, floats * sizeof(float)) != 0) {
            *buffer = NULL;
            return NULL;
        }
        *size = floats;
    }
    return *buffer;
}

/* Thread `thread` of `threads`: its share (a run of whole blocks) of every KV head's rows, for all
   the head's query heads, into `parts` (its own region); 0, or 1 where no memory. */
static int attend_share(const uint16_t *query, const uint16_t *keys, const uint16_t *values, const int64_t *starts,
                        const int64_t *lengths, int64_t key_stride, int64_t value_stride, int num_kv_heads, int thread,
                        int threads, int group, int dim, int v_dim, float scale, float *parts, int64_t longest) {
    const size_t pair_floats = 16 * (size_t)BLOCK * (MAX_DIM / 32); /* BLOCK * MAX_DIM / 32 vectors */
    const int64_t blocks = (longest + BLOCK - 1) / BLOCK, most = (blocks + threads - 1) / threads * BLOCK;
    struct scratch *held = scratch_here();
    float *scratch = held == NULL ? NULL : grown(&held->data, &held->floats, pair_floats + (size_t)group * (most + 2 * BLOCK));
    if (scratch == NULL) {
        return 1;
    }
    for (int h = 0; h < num_kv_heads; h++) {
        const int64_t n = lengths[h], head_blocks = (n + BLOCK - 1) / BLOCK;
        const int64_t lo = head_blocks * thread / threads * BLOCK, hi_block = head_blocks * (thread + 1) / threads * BLOCK;
        attend_part(query + (int64_t)h * group * dim, group, keys + starts[h] * key_stride, key_stride,
                    values + starts[h] * value_stride, value_stride, lo, hi_block < n ? hi_block : n, dim, v_dim, scale,
                    parts + ((size_t)thread * num_kv_heads + h) * group * (v_dim + 2), scratch + pair_floats,
                    (__m512i *)scratch);
    }
    return 0;
}

/* Every query head's output from the threads' partial results: each share's weights rescaled to
   the largest logit of all, summed, divided, rounded once to bfloat16 in the dims' order. */
static void merge(const float *parts, int threads, int heads, int v_dim, uint16_t *out) {
    const int64_t stats = v_dim + 2, per_thread = (int64_t)heads * stats;
    const int v_chunks = v_dim / 32;
    float sums[MAX_DIM];
    for (int i = 0; i < heads; i++) {
        float most = -__builtin_inff();
        for (int t = 0; t < threads; t++) {
            const float m = parts[t * per_thread + i * stats + v_dim];
            most = m > most ? m : most;
        }
        float total = 0.0f;
        memset(sums, 0, sizeof(float) * v_dim);
        for (int t = 0; t < threads; t++) {
            const float *part = parts + t * per_thread + i * stats;
            if (part[v_dim + 1] == EMPTY) {
                continue;
            }
            /* a share whose logits are all -inf weighs 0 beside a finite one (0 x NaN stays NaN);
               every logit -inf: NaN, as SDPA's */
            const float factor = threads == 1 ? 1.0f : __builtin_expf(part[v_dim] - most);
            total += factor * part[v_dim + 1];
            for (int d = 0; d < v_dim; d++) {
                sums[d] += factor * part[d];
            }
        }
        const float norm = 1.0f / total; /* every logit -inf: 1 / 0, and the output NaN, as SDPA's */
        /* the unpacks' order: lane 4L + i of a chunk's first 16 holds dim 8L + i, of its second 16 dim 8L + 4 + i */
        for (int c = 0; c < v_chunks; c++) {
            const float *lo = sums + 32 * c, *hi = lo + 16;
            for (int lane = 0; lane < 4; lane++) {
                for (int k = 0; k < 4; k++) {
                    store_bf16(out + (int64_t)i * v_dim + 32 * c + 8 * lane + k, lo[4 * lane + k] * norm);
                    store_bf16(out + (int64_t)i * v_dim + 32 * c + 8 * lane + 4 + k, hi[4 * lane + k] * norm);
                }
            }
        }
    }
}

/* KV head h: the lengths[h] rows from row starts[h] of the `rows` rows of keys and values.
   0: done; 1: what it does not take (dims not multiples of 32 up to MAX_DIM, a head with no
   entries or past the rows, a group not within 1-64); -1: no memory for its scratch. */
int kvcli_attend_decode(const uint16_t *query, const uint16_t *keys, const uint16_t *values, const int64_t *starts,
                        const int64_t *lengths, int64_t rows, int64_t key_stride, int64_t value_stride,
                        int num_kv_heads, int group, int dim, int v_dim, float scale, uint16_t *out, int threads) {
    if (dim % 32 || v_dim % 32 || dim <= 0 || v_dim <= 0 || dim > MAX_DIM || v_dim > MAX_DIM || group < 1 || group > 64) {
        return 1;
    }
    int64_t longest = 0, entries = 0;
    for (int h = 0; h < num_kv_heads; h++) {
        if (lengths[h] < 1 || starts[h] < 0 || starts[h] + lengths[h] > rows) {
            return 1;
        }
        longest = lengths[h] > longest ? lengths[h] : longest;
        entries += lengths[h];
    }
    const int shares = threads > 1 && entries * group * dim >= PARALLEL_FROM ? threads : 1;
    struct scratch *held = scratch_here();
    float *parts = held == NULL ? NULL : grown(&held->parts, &held->part_floats, (size_t)shares * num_kv_heads * group * (v_dim + 2));
    if (parts == NULL) {
        return -1;
    }
    int failed = 0, used = 1;
    if (shares == 1) {
        failed = attend_share(query, keys, values, starts, lengths, key_stride, value_stride, num_kv_heads, 0, 1, group, dim,
                              v_dim, scale, parts, longest);
    } else {
#pragma omp parallel num_threads(shares) reduction(| : failed)
        {
            const int count = omp_get_num_threads(); /* OpenMP may give fewer than asked */
            if (omp_get_thread_num() == 0) {
                used = count;
            }
            failed |= attend_share(query, keys, values, starts, lengths, key_stride, value_stride, num_kv_heads,
                                   omp_get_thread_num(), count, group, dim, v_dim, scale, parts, longest);
        }
    }
    if (failed) {
        return -1;
    }
    merge(parts, used, num_kv_heads * group, v_dim, out);
    return 0;
}
