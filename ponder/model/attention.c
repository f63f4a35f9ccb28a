/* Batch-invariant attention over a KV cache (llama.attend_queries; native.py builds and loads this file).

   Each computed token's query heads attend to the token's keys in the order plain decoding holds them: its row's
   slots [lo, hi), then `extra` slots (a tree token's ancestors and itself). The arithmetic for a (token, query head)
   depends only on its query, those keys in that order and D: scores by a fixed-lane dot product, a softmax summed
   lane-wise then across lanes in a fixed tree, values summed key after key. So a token gets the same bits whichever
   other tokens, rows or threads share the call, which speculative decoding with quantized weights needs to stay
   lossless (quant.py). Tokens of one group (a row's chain of new tokens: same row, same lo, no extra slots) share
   each key's load, which is what makes a verify forward cheaper than its tokens' decode steps.

   Layouts (float32): q, out [N, Hkv, G, D] contiguous (query head h * G + g reads KV head h); k, v: a cache of
   [B, Hkv, S, D] with strides (in floats) sb, sh, ss, D contiguous; tok [N, 5] int64: row, lo, hi, first extra,
   extra count; extra: slot numbers; groups [n_groups, 2] int64: first token, token count (a group's tokens have
   the same row and lo and, when there are several, no extra slots). work: float scratch, per thread
   (most tokens in a group) x (most keys of a token rounded up to 16) + (most tokens in a group) x D. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vec load(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store(float *p, vec x) { memcpy(p, &x, sizeof x); }

/* The lanes of x summed by halving: lanes i and i + 8, then i and i + 4, i + 2, i + 1. */
static inline float lane_sum(vec x) {
    vec y = x + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    y = y + __builtin_shufflevector(y, y, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15);
    y = y + __builtin_shufflevector(y, y, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    y = y + __builtin_shufflevector(y, y, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return y[0];
}

/* exp(x) for x <= 0 lane-wise (below -87, -inf included: 0): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its
   degree-6 Taylor polynomial (relative error < 2e-7), times 2^k set in the exponent bits. */
static inline vec exp_neg(vec x) {
    const vec zero = {0};
    const vec low = zero - 87.0f;
    ivec under = x < low;
    x = (vec)(((ivec)x & ~under) | ((ivec)low & under));
    ivec k = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec); /* x <= 0: rounds to nearest */
    vec kf = __builtin_convertvector(k, vec);
    vec r = x - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;
    vec p = zero + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vec e = p * (vec)((k + 127) << 23);
    return (vec)((ivec)e & ~under);
}

/* q . k over D (a multiple of LANES): lane-wise products summed over D, then across lanes. */
static inline __attribute__((always_inline)) float dot(const float *q, const float *k, int64_t D) {
    vec acc = load(q) * load(k);
    for (int64_t d = LANES; d < D; d += LANES) acc += load(q + d) * load(k + d);
    return lane_sum(acc);
}

static inline int64_t key_slot(int64_t j, int64_t lo, int64_t hi, const int64_t *ext) {
    return j < hi - lo ? lo + j : ext[j - (hi - lo)];
}

/* One query head (of KV head h's G) for every token of a group: T tokens, token t with query qs + t * qstride and
   n[t] keys (the group's first n[t] keys; the longest reads all `most`); s: T x nn scores, acc: T x D. */
static inline __attribute__((always_inline)) void attend_group(
    const float *qs, int64_t qstride, const float *kb, const float *vb, int64_t ss, int64_t lo, int64_t hi,
    const int64_t *ext, const int64_t *n, int64_t T, int64_t most, int64_t D, float scale, float *s, float *acc,
    float *outs) {
    int64_t nn = (most + LANES - 1) / LANES * LANES;
    float top[T > 0 ? T : 1];
    for (int64_t t = 0; t < T; t++) top[t] = -INFINITY;
    for (int64_t j = 0; j < most; j++) {
        const float *kj = kb + key_slot(j, lo, hi, ext) * ss;
        for (int64_t t = 0; t < T; t++) {
            if (j >= n[t]) continue;
            float x = dot(qs + t * qstride, kj, D) * scale;
            s[t * nn + j] = x;
            if (x > top[t]) top[t] = x;
        }
    }
    float total[T > 0 ? T : 1];
    for (int64_t t = 0; t < T; t++) { /* softmax numerators, summed lane-wise then across lanes */
        float *st = s + t * nn;
        for (int64_t j = n[t]; j < nn; j++) st[j] = -INFINITY;
        const vec zero = {0};
        vec m = zero + top[t], sum = zero;
        for (int64_t j = 0; j < nn; j += LANES) {
            vec e = exp_neg(load(st + j) - m);
            store(st + j, e);
            sum += e;
        }
        total[t] = lane_sum(sum);
    }
    memset(acc, 0, (size_t)(T * D) * sizeof(float));
    for (int64_t j = 0; j < most; j++) {
        const float *vj = vb + key_slot(j, lo, hi, ext) * ss;
        for (int64_t t = 0; t < T; t++) {
            if (j >= n[t]) continue;
            float p = s[t * nn + j];
            float *a = acc + t * D;
            for (int64_t d = 0; d < D; d += LANES) store(a + d, load(a + d) + p * load(vj + d));
        }
    }
    for (int64_t t = 0; t < T; t++) {
        float *o = outs + t * qstride;
        for (int64_t d = 0; d < D; d++) o[d] = n[t] > 0 ? acc[t * D + d] / total[t] : 0.0f;
    }
}

/* Returns 0, or -1 when a shape is outside the kernel's range (D not a positive multiple of LANES). */
int ponder_attend(const float *q, const float *k, const float *v, int64_t sb, int64_t sh, int64_t ss,
                  const int64_t *tok, const int64_t *extra, const int64_t *groups, int64_t n_groups, float *out,
                  int64_t Hkv, int64_t G, int64_t D, float scale, float *work, int64_t max_group, int64_t max_keys,
                  int threads) {
    if (D % LANES != 0 || D <= 0) return -1;
    int64_t nn = (max_keys + LANES - 1) / LANES * LANES, per_thread = max_group * (nn + D);
    int64_t items = n_groups * Hkv * G;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && items > 1)
    for (int64_t i = 0; i < items; i++) {
        int64_t grp = i / (Hkv * G), h = (i / G) % Hkv, g = i % G;
        int64_t first = groups[2 * grp], T = groups[2 * grp + 1];
        const int64_t *m = tok + 5 * first;
        int64_t b = m[0], lo = m[1], n[T], most = 0;
        for (int64_t t = 0; t < T; t++) {
            n[t] = tok[5 * (first + t) + 2] - lo + tok[5 * (first + t) + 4];
            if (n[t] > most) most = n[t];
        }
        int64_t hi = T == 1 ? m[2] : lo + most; /* several tokens: a chain, every key a slot of [lo, lo + most) */
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        float *s = work + (int64_t)omp_get_thread_num() * per_thread;
#else
        float *s = work;
#endif
        const float *qs = q + ((first * Hkv + h) * G + g) * D;
        float *outs = out + ((first * Hkv + h) * G + g) * D;
        const float *kb = k + b * sb + h * sh, *vb = v + b * sb + h * sh;
        int64_t qstride = Hkv * G * D;
        if (D == 64)
            attend_group(qs, qstride, kb, vb, ss, lo, hi, extra + m[3], n, T, most, 64, scale, s, s + T * nn, outs);
        else if (D == 128)
            attend_group(qs, qstride, kb, vb, ss, lo, hi, extra + m[3], n, T, most, 128, scale, s, s + T * nn, outs);
        else
            attend_group(qs, qstride, kb, vb, ss, lo, hi, extra + m[3], n, T, most, D, scale, s, s + T * nn, outs);
    }
    return 0;
}
