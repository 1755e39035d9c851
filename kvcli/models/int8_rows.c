/* kvcli's int8 weight-only products for a few rows (a decode step), AVX-512F.

   out[m, n] = bf16(scale[n] * sum_k float(x[m, k]) * w[n, k])
   x: (M, K) bfloat16, w: (N, K) int8, scale: (N,) bfloat16, out: (M, N) bfloat16. The same numbers
   as torch's `_weight_int8pack_mm` (the int8 weight widened to float32, products summed in
   float32, scaled, rounded once to bfloat16), in another order of summation.

   Two layouts of w:
   - rows (`kvcli_int8_rows`): row-major, as Int8Linear keeps it on disk; any N and K.
   - blocked (`kvcli_int8_blocked`): N and K multiples of 16; each block of 16 output channels
     stored as K/16 tiles of 16 rows x 16 columns, so that one block is read as one stream, front to
     back (Int8Linear.block_for_decode reorders a loaded weight in place).

   Why: at batch one torch's kernel read this project's 2-core EPYC's weights at 10-13 GB/s for
   the attention, MLP-input and output-head shapes, while the machine reads them at ~30-35 GB/s
   without multiplying. In the blocked layout (one stream per thread, 16 float32 accumulators, one
   vector of the input per 16 weights) the same products ran at 23-31 GB/s, row by row at 19-31
   (benchmarks/int8_kernel.py; docs/results.md, "Session 12"); several row-major rows read at
   once ran about as fast as torch's.

   Built by kvcli/models/int8_kernel.py with the C compiler it finds, once per machine; threads
   through OpenMP (the libgomp torch already loaded, so the threads are torch's). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest, ties to even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float row_dot(const float *x, const int8_t *w, int64_t K) {
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        even = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k)))), even);
        odd = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16)))), odd);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
    for (; k < K; k++) sum += x[k] * (float)w[k];
    return sum;
}

/* The M x K bfloat16 input rows as float32, in memory the caller frees; NULL if none was left. */
static float *widened_rows(const uint16_t *x, int64_t M, int64_t K) {
    float *rows = malloc((size_t)(M * K) * sizeof(float));
    if (rows != NULL)
        for (int64_t i = 0; i < M * K; i++) rows[i] = bf16_to_float(x[i]);
    return rows;
}

/* Both products return 0, or -1 if the rows' float32 copy could not be allocated (nothing is
   written then); the blocked one -2 for a shape it does not take. */
int kvcli_int8_rows(const uint16_t *x, const int8_t *w, const uint16_t *scale, uint16_t *out,
                    int64_t M, int64_t N, int64_t K, int threads) {
    float *rows = widened_rows(x, M, K);
    if (rows == NULL) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        const float s = bf16_to_float(scale[n]);
        for (int64_t m = 0; m < M; m++) /* the weight row stays in L1 for every input row */
            out[m * N + n] = float_to_bf16(row_dot(rows + m * K, row, K) * s);
    }
    free(rows);
    return 0;
}

#define BLOCK 16

/* w blocked: element (n, k) at ((n / 16) * (K / 16) + k / 16) * 256 + (n % 16) * 16 + k % 16. */
int kvcli_int8_blocked(const uint16_t *x, const int8_t *w, const uint16_t *scale, uint16_t *out,
                       int64_t M, int64_t N, int64_t K, int threads) {
    if (N % BLOCK != 0 || K % BLOCK != 0) return -2;
    float *rows = widened_rows(x, M, K);
    if (rows == NULL) return -1;
    const int64_t blocks = N / BLOCK, tiles = K / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *block = w + b * tiles * BLOCK * BLOCK;
        for (int64_t m = 0; m < M; m++) {
            const float *row = rows + m * K;
            __m512 sums[BLOCK];
            for (int r = 0; r < BLOCK; r++) sums[r] = _mm512_setzero_ps();
            for (int64_t t = 0; t < tiles; t++) {
                const __m512 xs = _mm512_loadu_ps(row + t * BLOCK);
                const int8_t *tile = block + t * BLOCK * BLOCK;
                for (int r = 0; r < BLOCK; r++)
                    sums[r] = _mm512_fmadd_ps(xs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(tile + r * BLOCK)))), sums[r]);
            }
            for (int r = 0; r < BLOCK; r++) {
                const int64_t n = b * BLOCK + r;
                out[m * N + n] = float_to_bf16(_mm512_reduce_add_ps(sums[r]) * bf16_to_float(scale[n]));
            }
        }
    }
    free(rows);
    return 0;
}
