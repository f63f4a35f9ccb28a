/* A run of decoder layers in one call, for 4-bit and int8-block weights (native.py builds this file together with
   q4mm.c and attention.c; native_layers.py drives it).

   A q4 decode step of SmolLM2 spends most of its time around its kernels rather than in them: 121 GEMM calls and
   30 attention calls, each with a Python wrapper, plus the norms, rotary embedding, SwiGLU, residual adds and cache
   writes between them (eager: ~1500 operators; compiled: fused, but still ~5 graph calls with guards, and the
   kernels called from Python). Here one call runs layers [a, b) for all M new tokens of a forward:

       x = rmsnorm(h) * w_attn;  qkv = x Wqkv (+ bias);  q, k = rope(q, k);  cache[row, slot] = k, v
       h += attend(q, cache) Wo;  x = rmsnorm(h) * w_mlp;  g, u = x Wgu;  h += (silu(g) * u) Wdown

   with the same GEMM (ponder_q4_mm, q4mm.c) and attention (ponder_attend, attention.c) the per-operator path calls,
   so those give the same bits, and elementwise work of its own (a summation order per token, a vector exp). Every
   step of it reads only its own token's values (the GEMM and attention are row-invariant), so a token gets the
   same bits whichever other tokens share the call: a verify forward computes exactly what the decode steps of its
   tokens would, and speculation over this path stays lossless against plain decoding on it.

   Arguments: h [M, E] (float32, updated in place); per layer a row of `weights` (int64: attention norm weight,
   MLP norm weight, then for Wqkv, Wo, Wgu, Wdown each the packed weight (q4.pack_native), its bias or 0 and its
   planes: 1 for a 4-bit weight, 2 for int8 blocks as two 4-bit planes whose column halves are added, quant.py) and
   of `caches` (its K and V cache, [B, Hkv, S, D] with strides sb, sh, ss in floats, D contiguous); `slots` [M, 2]:
   each token's row and cache slot; cos, sin [M, D] (sin with its first half negated, rope.py); `plan` for
   ponder_attend; `capture` [n_layers]: where to copy each layer's output (0: nowhere); `bulk`: every product on the
   GEMM's bulk kernel (ponder_q4_mm_bulk: AMX where the CPU has it, row-invariant too, other bits than
   ponder_q4_mm's), the choice of a model loaded with amx=True for all its forwards. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vexp.h"

int ponder_q4_mm(const float *x, const uint8_t *w, float *out, int64_t M, int64_t N, int64_t K, int threads);
int ponder_q4_mm_bulk(const float *x, const uint8_t *w, float *out, int64_t M, int64_t N, int64_t K, int threads);
int ponder_attend(const float *q, const float *k, const float *v, const int64_t *plan, float *out, int64_t sb,
                  int64_t sh, int64_t ss, int64_t Hkv, int64_t G, int64_t D, int threads);

#define VL 16
typedef float fvec __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t ivec16 __attribute__((vector_size(VL * sizeof(int32_t))));

#define WEIGHT_FIELDS 14 /* per layer: 2 norms + 4 linears x (packed, bias, planes) */

static inline fvec vload(const float *p) {
    fvec x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void vstore(float *p, fvec x) { memcpy(p, &x, sizeof x); }

/* exp(x) lane-wise, x clamped to [-87, 88] (exp(-87) is above the smallest normal float), by vexp.h's
   exp_scaled with k = x / ln2 rounded half away from zero. */
static inline fvec vexp(fvec x) {
    const fvec zero = {0};
    const fvec low = zero - 87.0f, high = zero + 88.0f;
    ivec16 under = x < low, over = x > high; /* lanes of -1 where true (NaN: neither, stays NaN) */
    x = (fvec)(((ivec16)x & ~under & ~over) | ((ivec16)low & under) | ((ivec16)high & over));
    fvec t = x * 1.44269504088896341f;
    ivec16 k = __builtin_convertvector(t + (fvec)((ivec16)(zero + 0.5f) | ((ivec16)t & (ivec16)(zero - 0.0f))),
                                       ivec16); /* round half away from zero */
    return exp_scaled(x, k);
}

/* out[m] = x[m] / rms(x[m]) * w, each row's squares summed in VL lanes over E, then the lanes in a fixed tree. */
static void rmsnorm(const float *x, const float *w, float *out, int64_t M, int64_t E, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * E;
        float *o = out + m * E;
        float lanes[VL] = {0};
        int64_t i = 0;
        if (E % VL == 0) {
            fvec acc = {0};
            for (; i < E; i += VL) {
                fvec v = vload(xr + i);
                acc += v * v;
            }
            vstore(lanes, acc);
        } else {
            for (; i < E; i++) lanes[i % VL] += xr[i] * xr[i];
        }
        for (int s = VL / 2; s > 0; s /= 2)
            for (int j = 0; j < s; j++) lanes[j] += lanes[j + s];
        float inv = 1.0f / sqrtf(lanes[0] / (float)E + eps);
        for (i = 0; i < E; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* y [M, N] = x [M, K] times a packed weight of `planes` x N columns (the planes' column blocks added), plus bias. */
static int linear(const float *x, const int64_t *lw, float *y, float *scratch, int64_t M, int64_t N, int64_t K,
                  int threads, int bulk) {
    int (*mm)(const float *, const uint8_t *, float *, int64_t, int64_t, int64_t, int) =
        bulk ? ponder_q4_mm_bulk : ponder_q4_mm;
    const uint8_t *w = (const uint8_t *)(intptr_t)lw[0];
    const float *bias = (const float *)(intptr_t)lw[1];
    int64_t planes = lw[2];
    int rc;
    if (planes == 1) {
        rc = mm(x, w, y, M, N, K, threads);
    } else {
        rc = mm(x, w, scratch, M, 2 * N, K, threads);
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] = scratch[m * 2 * N + n] + scratch[m * 2 * N + N + n];
    }
    if (rc == 0 && bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
    return rc;
}

/* Layers [0, n_layers) of `weights`/`caches` on h [M, E] (module doc). Returns 0, -1 for a shape the kernels refuse
   (D not a multiple of 16, widths not multiples of 32 / 16), -2 without memory. */
int ponder_decoder(float *h, int64_t M, int64_t E, int64_t H, int64_t Hkv, int64_t D, int64_t F, float eps,
                   int64_t n_layers, const int64_t *weights, const int64_t *caches, int64_t sb, int64_t sh, int64_t ss,
                   const int64_t *slots, const float *cos, const float *sin, const int64_t *plan,
                   const int64_t *capture, int bulk, int threads) {
    if (M <= 0 || n_layers <= 0) return 0;
    if (D % 16 || E % 32 || F % 32 || (H * D) % 32 || H % Hkv) return -1;
    const int64_t NQKV = (H + 2 * Hkv) * D;
    int64_t widest = 2 * F > NQKV ? 2 * F : NQKV; /* the widest output of the four projections */
    if (E > widest) widest = E;
    float *x = malloc(sizeof(float) * (size_t)(M * (E > H * D ? E : H * D)));
    float *qkv = malloc(sizeof(float) * (size_t)(M * widest));
    float *q = malloc(sizeof(float) * (size_t)(M * H * D));
    float *att = malloc(sizeof(float) * (size_t)(M * H * D));
    float *act = malloc(sizeof(float) * (size_t)(M * F));
    float *y = malloc(sizeof(float) * (size_t)(M * E));
    float *scratch = malloc(sizeof(float) * (size_t)(M * 2 * widest));
    int rc = (x && qkv && q && att && act && y && scratch) ? 0 : -2;
    const int64_t half = D / 2;
    for (int64_t l = 0; l < n_layers && rc == 0; l++) {
        const int64_t *lw = weights + l * WEIGHT_FIELDS;
        float *kc = (float *)(intptr_t)caches[2 * l], *vc = (float *)(intptr_t)caches[2 * l + 1];
        /* attention */
        rmsnorm(h, (const float *)(intptr_t)lw[0], x, M, E, eps);
        if ((rc = linear(x, lw + 2, qkv, scratch, M, NQKV, E, threads, bulk))) break;
        for (int64_t m = 0; m < M; m++) {
            const float *c = cos + m * D, *s = sin + m * D, *src = qkv + m * NQKV;
            float *kdst = kc + slots[2 * m] * sb + slots[2 * m + 1] * ss;
            float *vdst = vc + slots[2 * m] * sb + slots[2 * m + 1] * ss;
            for (int64_t j = 0; j < H + Hkv; j++) {
                const float *xj = src + j * D;
                float *o = j < H ? q + (m * H + j) * D : kdst + (j - H) * sh;
                for (int64_t i = 0; i < D; i++) {
                    float a = xj[i] * c[i], b = xj[i < half ? i + half : i - half] * s[i];
                    o[i] = a + b;
                }
            }
            for (int64_t j = 0; j < Hkv; j++) memcpy(vdst + j * sh, src + (H + Hkv + j) * D, sizeof(float) * D);
        }
        if ((rc = ponder_attend(q, kc, vc, plan, att, sb, sh, ss, Hkv, H / Hkv, D, threads))) break;
        if ((rc = linear(att, lw + 5, y, scratch, M, E, H * D, threads, bulk))) break;
        for (int64_t i = 0; i < M * E; i++) h[i] += y[i];
        /* MLP */
        rmsnorm(h, (const float *)(intptr_t)lw[1], x, M, E, eps);
        if ((rc = linear(x, lw + 8, qkv, scratch, M, 2 * F, E, threads, bulk))) break;
        for (int64_t m = 0; m < M; m++) {
            const float *g = qkv + m * 2 * F, *u = g + F;
            float *a = act + m * F;
            int64_t i = 0;
            for (; i + VL <= F; i += VL) {
                fvec gv = vload(g + i);
                vstore(a + i, gv / (1.0f + vexp(-gv)) * vload(u + i));
            }
            for (; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        if ((rc = linear(act, lw + 11, y, scratch, M, E, F, threads, bulk))) break;
        for (int64_t i = 0; i < M * E; i++) h[i] += y[i];
        if (capture[l]) memcpy((float *)(intptr_t)capture[l], h, sizeof(float) * (size_t)(M * E));
    }
    free(x);
    free(qkv);
    free(q);
    free(att);
    free(act);
    free(y);
    free(scratch);
    return rc;
}
