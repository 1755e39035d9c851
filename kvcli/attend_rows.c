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
   `keys` (`values`). KV heads run on torch's OpenMP threads when
   the layer is long enough to pay for them. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM 512
#define BLOCK 16 /* keys per block: one vector of logits */

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

/* The scaled logits of one query head `q` for m <= BLOCK key rows (zeros for the rest of the block). */
static inline __attribute__((always_inline)) void logits(const uint16_t *q, const uint16_t *rows, int64_t key_stride,
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

/* KV head h's `group` query heads over its n rows. Scratch: `scores` group * (n + 2 * BLOCK)
   floats, `acc` group * v_dim floats, `pairs` BLOCK / 2 * v_dim 32-bit words. */
static void attend_head(const uint16_t *query, int group, const uint16_t *keys, int64_t key_stride,
                        const uint16_t *values, int64_t value_stride, int64_t n, int dim, int v_dim, float scale,
                        uint16_t *out, float *scores, float *acc, __m512i *pairs) {
    const int chunks = dim / 32, v_chunks = v_dim / 32; /* 32 bf16 per vector */
    const int64_t row = n + 2 * BLOCK;
    /* logits, BLOCK keys at a time, each query head's products summed per key by one sums16 */
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t m = n - j0 < BLOCK ? n - j0 : BLOCK;
        for (int g = 0; g < group; g++) {
            const uint16_t *q = query + (int64_t)g * dim;
            const uint16_t *rows = keys + j0 * key_stride;
            float *into = scores + g * row + j0;
            if (m == BLOCK && chunks == 2) { /* the usual head dims, whole blocks: unrolled, in registers */
                logits(q, rows, key_stride, 2, BLOCK, scale, into);
            } else if (m == BLOCK && chunks == 4) {
                logits(q, rows, key_stride, 4, BLOCK, scale, into);
            } else {
                logits(q, rows, key_stride, chunks, m, scale, into);
            }
        }
    }
    /* softmax per query head, in place; zero weights past n, to a whole pair of keys */
    float norm[64];
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
        const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(top));
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
        norm[g] = 1.0f / _mm512_reduce_add_ps(total);
        /* the weights as bf16 pairs (p_2k, p_2k+1) in place: 32 floats become 16 words */
        uint32_t *words = (uint32_t *)p;
        for (int64_t k = 0; k < n; k += 32) {
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + k + 16), _mm512_loadu_ps(p + k));
            _mm512_storeu_si512(words + k / 2, both);
        }
    }
    /* the weighted values, BLOCK rows at a time: rows 2k and 2k + 1 interleaved once per block
       (their words paired per dim), then two rows per BF16 dot product for every query head */
    memset(acc, 0, sizeof(float) * group * v_dim);
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
            float *into = acc + g * v_dim;
            switch (v_chunks) { /* the usual head dims with their sums in registers */
            case 2: weigh_rows(weights, pairs, n_pairs, 2, into); break;
            case 4: weigh_rows(weights, pairs, n_pairs, 4, into); break;
            default: weigh_rows(weights, pairs, n_pairs, v_chunks, into); break;
            }
        }
    }
    /* lo's lane 4L + i holds dim 8L + i of its 32, hi's dim 8L + 4 + i (the unpacks' order) */
    for (int g = 0; g < group; g++) {
        for (int c = 0; c < v_chunks; c++) {
            const float *lo = acc + g * v_dim + 32 * c, *hi = lo + 16;
            for (int lane = 0; lane < 4; lane++) {
                for (int i = 0; i < 4; i++) {
                    store_bf16(out + (int64_t)g * v_dim + 32 * c + 8 * lane + i, lo[4 * lane + i] * norm[g]);
                    store_bf16(out + (int64_t)g * v_dim + 32 * c + 8 * lane + 4 + i, hi[4 * lane + i] * norm[g]);
                }
            }
        }
    }
}

/* This thread's scratch: kept between calls (a decode step's attention runs every layer, every
   token), grown when a longer head needs more (group x (longest + 32) floats and 16 KiB: 3.6 MB
   for 7 query heads of a 128K-entry head), held for the thread's life; NULL when no memory. */
static __thread float *kept_scratch;
static __thread size_t kept_floats;

static float *scratch_of(size_t floats) {
    if (floats > kept_floats) {
        free(kept_scratch);
        kept_floats = 0;
        if (posix_memalign((void **)&kept_scratch, 64, floats * sizeof(float)) != 0) {
            kept_scratch = NULL;
            return NULL;
        }
        kept_floats = floats;
    }
    return kept_scratch;
}

/* KV heads first, first + step, ... of the call (one thread's share); 0, or 1 where no memory */
static int attend_heads(const uint16_t *query, const uint16_t *keys, const uint16_t *values, const int64_t *starts,
                        const int64_t *lengths, int64_t key_stride, int64_t value_stride,
                        int num_kv_heads, int first, int step, int group, int dim, int v_dim, float scale,
                        uint16_t *out, int64_t longest, size_t floats) {
    const size_t pair_floats = 16 * (size_t)BLOCK * (MAX_DIM / 32); /* the value pairs: BLOCK * MAX_DIM / 32 vectors */
    float *scratch = scratch_of(floats + pair_floats);
    if (scratch == NULL) {
        return 1;
    }
    __m512i *pairs = (__m512i *)scratch; /* 64-byte aligned, first */
    float *scores = scratch + pair_floats, *acc = scores + (size_t)group * (longest + 2 * BLOCK);
    for (int h = first; h < num_kv_heads; h += step) {
        attend_head(query + (int64_t)h * group * dim, group, keys + starts[h] * key_stride, key_stride, values + starts[h] * value_stride, value_stride,
                    lengths[h], dim, v_dim, scale, out + (int64_t)h * group * v_dim, scores, acc, pairs);
    }
    return 0;
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
    /* below ~4M products a thread's start costs more than it saves */
    const int parallel = threads > 1 && num_kv_heads > 1 && entries * group * dim >= (1 << 22);
    const size_t floats = (size_t)group * (longest + 2 * BLOCK) + (size_t)group * v_dim;
    int failed = 0;
    if (!parallel) {
        failed = attend_heads(query, keys, values, starts, lengths, key_stride, value_stride, num_kv_heads, 0, 1,
                              group, dim, v_dim, scale, out, longest, floats);
    } else {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        failed |= attend_heads(query, keys, values, starts, lengths, key_stride, value_stride, num_kv_heads,
                               omp_get_thread_num(), omp_get_num_threads(), group, dim, v_dim, scale, out, longest, floats);
    }
    return failed ? -1 : 0;
}
