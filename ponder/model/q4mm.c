/* 4-bit weight GEMM for --dtype q4 (q4.py packs the weights; native.py builds and loads this file).

   y[r, n] = sum_k x[r, k] * w[n, k] where w = d * q + m per block of 32 weights along k (GGUF's Q4_1; Q4_0 is
   m = -8 d), q a 4-bit code, d and m fp16. Activations are rounded to bf16 (round to nearest even); d and m are
   used as stored. Per block, with s = the block's sum of bf16 activations,

       sum_k x_k w_k = d * (sum_k x_k (128 + q_k) - 128 s) + m s,

   because 128 + q (q < 16) is a bf16 whose bits are 0x4300 | q: the codes become bf16 by one OR, and the products
   of bf16 pairs are exact in fp32 (AVX512-BF16's vdpbf16ps sums two of them into an fp32 lane).

   Lanes are output columns: a vector holds 16 columns' pairs of codes (k, k + 1), each row's pair of activations
   is broadcast, so a row costs one vdpbf16ps per 32 codes and the weights are unpacked once for up to 8 rows. A
   column's sum runs over its blocks in order, within a block over the pairs in a fixed order (0, 8, 1, 9, ..., 7,
   15), and nothing adds across lanes: a row's bits depend only on its own activations and the weights, never on
   the other rows of the call or on how columns are split among threads (speculative decoding's verify forwards
   stay lossless against one-token decode steps). Without AVX512-BF16 the same sums run lane by lane in scalar
   code (the same order, the same bits except for subnormal activations, which vdpbf16ps reads as zero; only
   slow), and q4.py keeps PyTorch's int4 kernel instead. An infinite activation gives NaN (inf - inf in the
   block's correction), where a plain product would give an infinity.

   Bulk products (``ponder_q4_mm_bulk``: a prefill's many rows, where a row need not match a decode step's bits)
   run on AMX where the CPU has it (Intel since Sapphire Rapids; Linux asks the kernel for the tile state once):
   per block, one TDPBF16PS multiplies up to 16 rows by the 16 x 32 unpacked codes of a strip, then the same d/m
   correction as above. The products are the same; the sums' rounding is AMX's own (it differs from vdpbf16ps's in
   last bits), still per row: a row's bits depend on nothing else in the call. Elsewhere bulk is ponder_q4_mm.

   Weight layout (q4.py, ``pack_native``): strips of 16 columns; per strip, per block: 256 code bytes (8 chunks of
   32 bytes; in chunk p, byte 2c + e holds column c's code k = 2p + e in its low nibble and k = 16 + 2p + e in its
   high nibble), then 16 fp16 d, then 16 fp16 m (320 bytes, the GGUF's 20 bytes per block of 32). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define FAST 1
#else
#define FAST 0
#endif
#if FAST && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX 1
#else
#define AMX 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define COLS 16
#define BLOCK 32
#define CODE_BYTES (BLOCK * COLS / 2)
#define BLOCK_BYTES (CODE_BYTES + 4 * COLS)
#define MAX_ROWS 8
#define SMAX 8 /* most strips of a tile */

int ponder_q4_fast(void) { return FAST; }

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float from_fp16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7F800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The code of column c, weight k (0..31) of a block. */
static inline int code_at(const uint8_t *blk, int c, int k) {
    int hi = k >= 16, p = (k - 16 * hi) >> 1, e = k & 1;
    uint8_t byte = blk[p * 32 + 2 * c + e];
    return hi ? byte >> 4 : byte & 0x0F;
}

#if FAST
/* A block's 16 d and 16 m (fp16) as fp32 lanes. */
static inline void scales(const uint8_t *blk, __m512 *dv, __m512 *mv) {
    *dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + CODE_BYTES)));
    *mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + CODE_BYTES + 2 * COLS)));
}

/* The running sums plus one block's: acc + d (sum - 128 s) + m s, sum = the block's sum of x (128 + q). */
static inline __m512 add_block(__m512 acc, __m512 dv, __m512 mv, __m512 sum, float s128, float s) {
    return _mm512_fmadd_ps(mv, _mm512_set1_ps(s), _mm512_fmadd_ps(dv, _mm512_sub_ps(sum, _mm512_set1_ps(s128)), acc));
}

/* Rows [0, R) x strips [0, S) of 16 columns: R and S are constants at every call, so acc and tmp live in
   registers. */
static inline __attribute__((always_inline)) void tile(const uint8_t *w, long strip_bytes, int KB,
                                                        const uint32_t *xb, const float *xs, const float *xs128,
                                                        float *out, long N, int R, int S) {
    __m512 tmp[MAX_ROWS][SMAX], acc[MAX_ROWS][SMAX];
    const int inreg = R * S <= 8; /* the sums in registers while they fit, else in out (L1) */
    const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    const long xstride = KB * 16;
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            acc[r][s] = _mm512_setzero_ps();
            if (!inreg) _mm512_storeu_ps(out + r * N + s * COLS, acc[r][s]);
        }
    for (int b = 0; b < KB; b++) {
        for (int r = 0; r < R; r++)
            for (int s = 0; s < S; s++) tmp[r][s] = _mm512_setzero_ps();
        for (int p = 0; p < 8; p++) {
            __m512i lo[SMAX], hi[SMAX];
            for (int s = 0; s < S; s++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(w + s * strip_bytes + (long)b * BLOCK_BYTES + p * 32));
                __m512i v = _mm512_cvtepu8_epi16(raw);
                lo[s] = _mm512_ternarylogic_epi32(v, low, bias, 0xEA); /* (v & low) | bias */
                hi[s] = _mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
            }
            for (int r = 0; r < R; r++) {
                __m512i xl = _mm512_set1_epi32((int)xb[r * xstride + b * 16 + p]);
                __m512i xh = _mm512_set1_epi32((int)xb[r * xstride + b * 16 + p + 8]);
                for (int s = 0; s < S; s++) {
                    tmp[r][s] = _mm512_dpbf16_ps(tmp[r][s], (__m512bh)lo[s], (__m512bh)xl);
                    tmp[r][s] = _mm512_dpbf16_ps(tmp[r][s], (__m512bh)hi[s], (__m512bh)xh);
                }
            }
        }
        for (int s = 0; s < S; s++) {
            __m512 dv, mv;
            scales(w + s * strip_bytes + (long)b * BLOCK_BYTES, &dv, &mv);
            for (int r = 0; r < R; r++) {
                __m512 a = inreg ? acc[r][s] : _mm512_loadu_ps(out + r * N + s * COLS);
                a = add_block(a, dv, mv, tmp[r][s], xs128[r * KB + b], xs[r * KB + b]);
                if (inreg)
                    acc[r][s] = a;
                else
                    _mm512_storeu_ps(out + r * N + s * COLS, a);
            }
        }
    }
    if (inreg)
        for (int r = 0; r < R; r++)
            for (int s = 0; s < S; s++) _mm512_storeu_ps(out + r * N + s * COLS, acc[r][s]);
}

#define TILE_CASE(R, S)                                                                                              \
    case (R) * 16 + (S):                                                                                              \
        tile(w, strip_bytes, KB, xb, xs, xs128, out, N, R, S);                                                      \
        break;

static void tile_any(const uint8_t *w, long strip_bytes, int KB, const uint32_t *xb, const float *xs,
                     const float *xs128, float *out, long N, int R, int S) {
    switch (R * 16 + S) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 4) TILE_CASE(1, 8)
        TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 4) TILE_CASE(2, 8)
        TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(3, 4)
        TILE_CASE(4, 1) TILE_CASE(4, 2) TILE_CASE(4, 4)
        TILE_CASE(5, 1) TILE_CASE(5, 2)
        TILE_CASE(6, 1) TILE_CASE(6, 2)
        TILE_CASE(7, 1) TILE_CASE(7, 2)
        TILE_CASE(8, 1) TILE_CASE(8, 2)
    }
}
#else
/* The same sums as tile(), lane by lane. */
static void tile_any(const uint8_t *w, long strip_bytes, int KB, const uint32_t *xb, const float *xs,
                     const float *xs128, float *out, long N, int R, int S) {
    const long xstride = KB * 16;
    for (int s = 0; s < S; s++)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < COLS; c++) {
                float acc = 0.0f;
                for (int b = 0; b < KB; b++) {
                    const uint8_t *blk = w + s * strip_bytes + (long)b * BLOCK_BYTES;
                    float t = 0.0f;
                    for (int p = 0; p < 8; p++)
                        for (int h = 0; h < 2; h++) {
                            uint32_t pair = xb[r * xstride + b * 16 + p + 8 * h];
                            int k = 16 * h + 2 * p;
                            /* vdpbf16ps: the odd element's product first, then the even one's */
                            t = __builtin_fmaf(from_bf16((uint16_t)(pair >> 16)), 128.0f + code_at(blk, c, k + 1), t);
                            t = __builtin_fmaf(from_bf16((uint16_t)pair), 128.0f + code_at(blk, c, k), t);
                        }
                    uint16_t dh, mh;
                    memcpy(&dh, blk + CODE_BYTES + 2 * c, 2);
                    memcpy(&mh, blk + CODE_BYTES + 2 * COLS + 2 * c, 2);
                    acc = __builtin_fmaf(from_fp16(dh), t - xs128[r * KB + b], acc);
                    acc = __builtin_fmaf(from_fp16(mh), xs[r * KB + b], acc);
                }
                out[r * N + s * COLS + c] = acc;
            }
}
#endif

/* x's rows as bf16 pairs (xb [M, K / 2]) and per block their sum and 128 times it (xs, xs128 [M, K / 32]). */
static void split_rows(const float *x, int64_t M, int64_t K, uint32_t *xb, float *xs, float *xs128) {
    const int KB = (int)(K / BLOCK);
    for (long r = 0; r < M; r++)
        for (int b = 0; b < KB; b++) {
            float sum = 0.0f;
            for (int j = 0; j < BLOCK; j += 2) {
                uint16_t a = to_bf16(x[r * K + b * BLOCK + j]), c = to_bf16(x[r * K + b * BLOCK + j + 1]);
                xb[r * (K / 2) + b * 16 + j / 2] = (uint32_t)a | ((uint32_t)c << 16);
                sum += from_bf16(a);
                sum += from_bf16(c);
            }
            xs[r * KB + b] = sum;
            xs128[r * KB + b] = 128.0f * sum;
        }
}

#if AMX
#define AMX_ROWS 16
#define AMX_STRIPS 3 /* tiles: 0 the rows' activations, 1-3 a strip's codes each, 4-6 a strip's block sums each */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Rows [0, R) (R <= 16) x strips [0, S) (S <= 3): per block, the codes of each strip unpacked to bf16 (128 + q, as
   tile() does) in the layout TDPBF16PS reads (row j: the 16 columns' pairs (2j, 2j + 1)), one product per strip,
   then the block's correction in fp32 lanes. */
static void amx_tile(const uint8_t *w, long strip_bytes, int KB, const uint32_t *xb, long xb_stride,
                     const float *xs, const float *xs128, float *out, long N, int R, int S) {
    __attribute__((aligned(64))) uint16_t codes[AMX_STRIPS][16 * 32];
    __attribute__((aligned(64))) float sums[AMX_STRIPS][AMX_ROWS * COLS];
    __m512 acc[AMX_ROWS][AMX_STRIPS];
    const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    for (int b = 0; b < KB; b++) {
        for (int s = 0; s < S; s++) {
            const uint8_t *blk = w + s * strip_bytes + (long)b * BLOCK_BYTES;
            for (int p = 0; p < 8; p++) { /* chunk p: pairs p (low nibbles) and 8 + p (high nibbles) */
                __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + p * 32)));
                _mm512_store_si512((__m512i *)(codes[s] + p * 32), _mm512_ternarylogic_epi32(v, low, bias, 0xEA));
                _mm512_store_si512((__m512i *)(codes[s] + (8 + p) * 32), _mm512_or_si512(_mm512_srli_epi16(v, 4), bias));
            }
        }
        _tile_loadd(0, xb + b * 16, xb_stride);
        _tile_zero(4);
        _tile_loadd(1, codes[0], 64);
        _tile_dpbf16ps(4, 0, 1);
        _tile_stored(4, sums[0], 64);
        if (S > 1) {
            _tile_zero(5);
            _tile_loadd(2, codes[1], 64);
            _tile_dpbf16ps(5, 0, 2);
            _tile_stored(5, sums[1], 64);
        }
        if (S > 2) {
            _tile_zero(6);
            _tile_loadd(3, codes[2], 64);
            _tile_dpbf16ps(6, 0, 3);
            _tile_stored(6, sums[2], 64);
        }
        for (int s = 0; s < S; s++) {
            __m512 dv, mv;
            scales(w + s * strip_bytes + (long)b * BLOCK_BYTES, &dv, &mv);
            for (int r = 0; r < R; r++)
                acc[r][s] = add_block(acc[r][s], dv, mv, _mm512_load_ps(sums[s] + r * COLS), xs128[r * KB + b],
                                      xs[r * KB + b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) _mm512_storeu_ps(out + r * N + s * COLS, acc[r][s]);
}
#endif

/* 1 where bulk products run on AMX (asks Linux for the tile state on the first call), else 0. */
int ponder_q4_amx(void) {
#if AMX
    static int ready = -1; /* set once; a race only repeats the same request */
    if (ready < 0) ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ready;
#else
    return 0;
#endif
}

#if AMX
/* One thread's share of a bulk product on AMX: strips [first, last), every row, in tiles of 16 rows x 3 strips. */
static void amx_rows(const uint8_t *w, long strip_bytes, int KB, const uint32_t *xb, const float *xs,
                     const float *xs128, float *out, int64_t M, int64_t N, int64_t K, long first, long last) {
    for (long r0 = 0; r0 < M; r0 += AMX_ROWS) {
        int R = (int)(M - r0 < AMX_ROWS ? M - r0 : AMX_ROWS);
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        cfg.rows[0] = (uint8_t)R; /* R rows of 32 bf16 activations */
        cfg.colsb[0] = 64;
        for (int i = 1; i <= 2 * AMX_STRIPS; i++) { /* 16 pairs of rows of codes; then R rows of 16 fp32 sums */
            cfg.rows[i] = (uint8_t)(i <= AMX_STRIPS ? 16 : R);
            cfg.colsb[i] = 64;
        }
        _tile_loadconfig(&cfg);
        for (long s0 = first; s0 < last;) {
            int n = (int)(last - s0 < AMX_STRIPS ? last - s0 : AMX_STRIPS);
            amx_tile(w + s0 * strip_bytes, strip_bytes, KB, xb + r0 * (K / 2), K * 2, xs + r0 * KB, xs128 + r0 * KB,
                     out + r0 * N + s0 * COLS, N, R, n);
            s0 += n;
        }
        _tile_release();
    }
}
#endif

/* out [M, N] = x [M, K] times the packed weight, on AMX (``amx``, where it runs) or the row-invariant tiles. */
static int multiply(const float *x, const uint8_t *w, float *out, int64_t M, int64_t N, int64_t K, int threads,
                    int amx) {
    if (K % BLOCK || N % COLS || M < 0 || N < 0 || K < 0) return -1;
    if (M == 0 || N == 0) return 0;
    const int KB = (int)(K / BLOCK);
    const long strips = N / COLS, strip_bytes = (long)KB * BLOCK_BYTES;
    uint32_t *xb = malloc(sizeof(uint32_t) * (size_t)(M * K / 2 + 1));
    float *xs = malloc(sizeof(float) * (size_t)(2 * M * KB + 1));
    if (!xb || !xs) {
        free(xb);
        free(xs);
        return -2;
    }
    float *xs128 = xs + M * KB;
    split_rows(x, M, K, xb, xs, xs128);
    if (threads < 1) threads = 1;
    if (threads > strips) threads = (int)strips;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        long first = strips * t / threads, last = strips * (t + 1) / threads;
#if AMX
        if (amx) {
            amx_rows(w, strip_bytes, KB, xb, xs, xs128, out, M, N, K, first, last);
            continue;
        }
#endif
        for (long r0 = 0; r0 < M; r0 += MAX_ROWS) {
            int R = (int)(M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS);
            int S = R <= 2 ? 8 : R <= 4 ? 4 : 1; /* tiles of 8-16 vectors of sums (measured on AVX512-BF16) */
            for (long s0 = first; s0 < last;) {
                int n = (int)(last - s0 < S ? last - s0 : S);
                n = n >= 8 ? 8 : n >= 4 ? 4 : n >= 2 ? 2 : 1;
                tile_any(w + s0 * strip_bytes, strip_bytes, KB, xb + r0 * (K / 2), xs + r0 * KB, xs128 + r0 * KB,
                         out + r0 * N + s0 * COLS, N, R, n);
                s0 += n;
            }
        }
    }
    free(xb);
    free(xs);
    (void)amx;
    return 0;
}

/* out [M, N] = x [M, K] (float32, rows contiguous) times the packed weight of N x K (module doc). Returns 0, -1 for
   a shape the layout cannot hold, -2 without memory. */
int ponder_q4_mm(const float *x, const uint8_t *w, float *out, int64_t M, int64_t N, int64_t K, int threads) {
    return multiply(x, w, out, M, N, K, threads, 0);
}

/* ponder_q4_mm for bulk products (module doc): on AMX where the CPU has it, else ponder_q4_mm itself. */
int ponder_q4_mm_bulk(const float *x, const uint8_t *w, float *out, int64_t M, int64_t N, int64_t K, int threads) {
    return multiply(x, w, out, M, N, K, threads, ponder_q4_amx());
}
