/* y = W x (+ b) for one row x, with W in bfloat16 or int8: decoding at batch 1.
 *
 *   samout_bf16_gemv:  y[o] = sum_i W[o, i] x[i] + b[o]             W bfloat16
 *   samout_int8_gemv:  y[o] = scale[o] * sum_i Q[o, i] x[i] + b[o]   Q int8 (weight-only)
 *
 * x, y, b and scale are float32 and the sums are float32: the input is not rounded or
 * quantized. One token's decode reads every weight once, so this is bound by memory
 * bandwidth. oneDNN's bf16 kernels read 768-wide matrices at 15-25 GB/s at batch 1 on the
 * test machine (their fixed cost per call is about as long as the read), and fbgemm's
 * int8 kernel quantizes the input on every call; these read the weights as one
 * sequential stream at 30-45 GB/s. samout/ops/row_gemv.py builds this file on first use
 * with the machine's C compiler (-march=native) and falls back to oneDNN / fbgemm where
 * it cannot.
 *
 * Layout (samout.ops.row_gemv.pack_rows): W [O, I] stored as [O4][I16][ROWS][16], where
 * O4 = ceil(O / ROWS), I16 = ceil(I / 16), zero-padded: each block of ROWS output rows is
 * one contiguous run, read front to back while ROWS float32 accumulators take a 16-wide
 * slice of x each step. bf16 -> float32 is a 16-bit shift (exact), int8 -> float32 a sign
 * extension and a conversion (exact). Threads (OpenMP: the runtime torch already loaded)
 * take contiguous ranges of row blocks.
 */
#include <stdint.h>
#include <omp.h>
#include <immintrin.h>

#ifndef __AVX512F__
#error "row_gemv needs AVX-512 (the caller falls back to oneDNN / fbgemm)"
#endif

#define ROWS 4
/* Software prefetch this far ahead of the read, into L2: the hardware prefetcher alone
 * left the cold-cache (DRAM) read at 15-20 GB/s. 32 KiB into L2 was the best of 4-64 KiB,
 * into L1 or L2, for the 85M model's matrices read cold (26 GB/s for bf16, float32's MKL
 * read being 27 GB/s), and a call starts by prefetching its first 32 KiB at once. */
#define PREFETCH_BYTES 32768

static inline __m512 load_bf16(const void *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load_int8(const void *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* The slice of x for step k; the last may be partial: its weights are zero padding, but x
 * there is not ours to read. */
static inline __m512 load_x(const float *x, int64_t k, int64_t i16, __mmask16 tail) {
    return k + 1 < i16 ? _mm512_loadu_ps(x + 16 * k) : _mm512_maskz_loadu_ps(tail, x + 16 * k);
}

#define ROW_BLOCKS(NAME, TYPE, LOAD)                                                          \
    static void NAME(const TYPE *w, const float *x, const float *scale, const float *bias,   \
                     float *y, int64_t b0, int64_t b1, int64_t out, int64_t in) {            \
        const int64_t i16 = (in + 15) / 16;                                                  \
        const __mmask16 tail = (in % 16) ? (__mmask16)((1u << (in % 16)) - 1) : 0xFFFF;     \
        const char *start = (const char *)(w + b0 * ROWS * i16 * 16);                        \
        for (int64_t f = 0; b0 < b1 && f < PREFETCH_BYTES; f += 64)                          \
            _mm_prefetch(start + f, _MM_HINT_T1);                                            \
        for (int64_t b = b0; b < b1; b++) {                                                  \
            const TYPE *p = w + b * ROWS * i16 * 16;                                         \
            __m512 acc[ROWS];                                                                \
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();                     \
            for (int64_t k = 0; k < i16; k++, p += ROWS * 16) {                              \
                __m512 xv = load_x(x, k, i16, tail);                                         \
                for (int f = 0; f < (int)sizeof(TYPE); f++) /* the lines of one step */       \
                    _mm_prefetch((const char *)p + PREFETCH_BYTES + 64 * f, _MM_HINT_T1);    \
                for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(LOAD(p + 16 * r), xv, acc[r]); \
            }                                                                                \
            for (int r = 0; r < ROWS; r++) {                                                 \
                int64_t o = b * ROWS + r;                                                    \
                if (o < out) {                                                               \
                    float s = _mm512_reduce_add_ps(acc[r]);                                  \
                    y[o] = (scale ? scale[o] * s : s) + (bias ? bias[o] : 0.0f);             \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }

ROW_BLOCKS(bf16_blocks, uint16_t, load_bf16)
ROW_BLOCKS(int8_blocks, int8_t, load_int8)

void samout_bf16_gemv(const uint16_t *w, const float *x, const float *bias, float *y,
                      int64_t out, int64_t in, int threads) {
    const int64_t blocks = (out + ROWS - 1) / ROWS;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        bf16_blocks(w, x, 0, bias, y, blocks * t / n, blocks * (t + 1) / n, out, in);
    }
}

void samout_int8_gemv(const int8_t *q, const float *scale, const float *x, const float *bias,
                      float *y, int64_t out, int64_t in, int threads) {
    const int64_t blocks = (out + ROWS - 1) / ROWS;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int8_blocks(q, x, scale, bias, y, blocks * t / n, blocks * (t + 1) / n, out, in);
    }
}

int samout_row_gemv_rows(void) { return ROWS; }
