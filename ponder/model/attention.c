/* Batch-invariant attention over a KV cache (llama.attend_queries; native.py builds and loads this file).

   Each computed token's query heads attend to the token's keys in the order plain decoding holds them: its row's
   slots [lo, hi), then `extra` slots (a tree token's ancestors and itself). The arithmetic for a (token, query head)
   depends only on its query, those keys in that order and D: scores by a fixed-lane dot product (lanes summed in a
   fixed tree, 16 keys packed together), a softmax summed
   lane-wise then across lanes in a fixed tree, values summed key after key. So a token gets the same bits whichever
   other tokens, rows or threads share the call, which speculative decoding with quantized weights needs to stay
   lossless (quant.py). Tokens of one group (a row's chain of new tokens: same row, same lo, no extra slots) share
   each key's load, which is what makes a verify forward cheaper than its tokens' decode steps.

   Layouts (float32): q, out [N, Hkv, G, D] contiguous (query head h * G + g reads KV head h); k, v: a cache of
   [B, Hkv, S, D] with strides (in floats) sb, sh, ss, D contiguous; tok [N, 5] int64: row, lo, hi, first extra,
   extra count; extra: slot numbers; groups [n_groups, 2] int64: first token, token count (a group's tokens have
   the same row and lo and, when there are several, no extra slots). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vexp.h"

#define LANES 16
#define VBLOCK 64 /* keys per block of the value sums (their pointers in registers/L1) */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

/* Lanes of a and b picked by index (0-15: a's, 16-31: b's): clang and GCC 12+ spell it __builtin_shufflevector,
   older GCC __builtin_shuffle (define PONDER_SHUFFLE_MASK to build that spelling on a new compiler). */
#if !defined(PONDER_SHUFFLE_MASK) && (defined(__clang__) || __GNUC__ >= 12)
#define PICK(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PICK(a, b, ...) __builtin_shuffle(a, b, (ivec){__VA_ARGS__})
#endif

static inline vec load(const float *p) {
    vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store(float *p, vec x) { memcpy(p, &x, sizeof x); }

/* Lane-wise a > b ? a : b (a NaN lane of a gives b's, as a scalar running maximum skips NaN). */
static inline vec vmax(vec a, vec b) {
    ivec m = a > b;
    return (vec)(((ivec)a & m) | ((ivec)b & ~m));
}

/* The lanes of x summed by halving: lanes i and i + 8, then i and i + 4, i + 2, i + 1. */
static inline float lane_sum(vec x) {
    vec y = x + PICK(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    y = y + PICK(y, y, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15);
    y = y + PICK(y, y, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    y = y + PICK(y, y, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return y[0];
}

/* Sixteen vectors' lane sums at once: lane i of the result is lane_sum(x[i]) to the bit (the same pairs added at
   every level, only packed into fewer vector operations). */
static inline vec lane_sums16(const vec *x) {
    vec a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = PICK(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               PICK(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                       31);
    for (int i = 0; i < 4; i++)
        b[i] = PICK(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               PICK(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        c[i] = PICK(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               PICK(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return PICK(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           PICK(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* exp(x) for x <= 0 lane-wise (below -87, -inf included: 0), by vexp.h's exp_scaled. */
static inline vec exp_neg(vec x) {
    const vec zero = {0};
    const vec low = zero - 87.0f;
    ivec under = x < low;
    x = (vec)(((ivec)x & ~under) | ((ivec)low & under));
    ivec k = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec); /* x <= 0: rounds to nearest */
    vec e = exp_scaled(x, k);
    return (vec)((ivec)e & ~under);
}

static inline int64_t key_slot(int64_t j, int64_t lo, int64_t hi, const int64_t *ext) {
    return j < hi - lo ? lo + j : ext[j - (hi - lo)];
}

/* The value sums of queries u0 .. u0 + UT - 1 (a group's, attend_group) over keys [jb, jb + cnt) at vp, added to
   acc (U x D; jb = 0: from zero): query u takes the probabilities s[u * nn + jb + i] of its first n[u] - jb of
   them, key after key, into D / LANES lane-wise sums, exactly as alone. */
static inline __attribute__((always_inline)) void value_tile(int64_t UT, int64_t u0, const int64_t *n, int64_t jb,
                                                              int64_t cnt, const float *const *vp, const float *s,
                                                              int64_t nn, float *acc, int64_t D) {
    const vec zero = {0};
    vec a[4][4]; /* UT <= 4 queries of D <= 64: fixed sizes, so the sums stay in registers */
    int64_t c[4], common = cnt;
    for (int64_t t = 0; t < UT; t++) {
        int64_t u = u0 + t;
        c[t] = jb >= n[u] ? 0 : n[u] - jb < cnt ? n[u] - jb : cnt;
        common = c[t] < common ? c[t] : common;
        for (int64_t k = 0; k < D / LANES; k++) a[t][k] = jb == 0 ? zero : load(acc + u * D + k * LANES);
    }
    for (int64_t i = 0; i < common; i++) { /* the keys every query of the tile reads */
        vec x[4];
        for (int64_t k = 0; k < D / LANES; k++) x[k] = load(vp[i] + k * LANES);
        for (int64_t t = 0; t < UT; t++) {
            float p = s[(u0 + t) * nn + jb + i];
            for (int64_t k = 0; k < D / LANES; k++) a[t][k] += p * x[k];
        }
    }
    for (int64_t t = 0; t < UT; t++) {
        for (int64_t i = common; i < c[t]; i++) { /* then each query's own last keys */
            float p = s[(u0 + t) * nn + jb + i];
            for (int64_t k = 0; k < D / LANES; k++) a[t][k] += p * load(vp[i] + k * LANES);
        }
        if (c[t] > 0)
            for (int64_t k = 0; k < D / LANES; k++) store(acc + (u0 + t) * D + k * LANES, a[t][k]);
    }
}

/* Query heads g0 .. g0 + Gi - 1 (of KV head h's G) for every token of a group: U = T x Gi queries, query u = (token
   t = u / Gi, head g0 + u % Gi) at qs + t * qstride + (u % Gi) * D with n[t] keys (the group's first n[t] keys; the
   longest reads all `most`); s: U x nn scores, acc: U x D. Each query's arithmetic is the same whatever U is. */
static inline __attribute__((always_inline)) void attend_group(
    const float *qs, int64_t qstride, const float *kb, const float *vb, int64_t ss, int64_t lo, int64_t hi,
    const int64_t *ext, const int64_t *nt, int64_t T, int64_t Gi, int64_t most, int64_t D, float scale, float *s,
    float *acc, float *outs) {
    int64_t U = T * Gi;
    int64_t n[U > 0 ? U : 1];
    for (int64_t u = 0; u < U; u++) n[u] = nt[u / Gi];
    int64_t nn = (most + LANES - 1) / LANES * LANES;
    const vec zero = {0}, lowest = zero - INFINITY;
    const ivec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vec top[U > 0 ? U : 1]; /* per query, its scores' lane-wise maximum (a max is exact: any order gives the same) */
    for (int64_t u = 0; u < U; u++) top[u] = lowest;
    for (int64_t jb = 0; jb < most; jb += LANES) { /* scores, 16 keys at a time */
        int64_t cnt = most - jb < LANES ? most - jb : LANES;
        const float *kp[LANES];
        for (int64_t i = 0; i < cnt; i++) kp[i] = kb + key_slot(jb + i, lo, hi, ext) * ss;
        for (int64_t u = 0; u < U; u++) {
            if (jb >= n[u]) continue;
            const float *qu = qs + (u / Gi) * qstride + (u % Gi) * D;
            int64_t c = n[u] - jb < cnt ? n[u] - jb : cnt;
            vec part[LANES];
            for (int64_t i = 0; i < c; i++) {
                vec x = load(qu) * load(kp[i]);
                for (int64_t d = LANES; d < D; d += LANES) x += load(qu + d) * load(kp[i] + d);
                part[i] = x;
            }
            for (int64_t i = c; i < LANES; i++) part[i] = zero;
            vec x = lane_sums16(part) * scale;
            store(s + u * nn + jb, x);
            if (c < LANES) { /* lanes past the query's keys take no part */
                ivec in = lane < (ivec){0} + (int32_t)c;
                x = (vec)(((ivec)x & in) | ((ivec)lowest & ~in));
            }
            top[u] = vmax(x, top[u]);
        }
    }
    float total[U > 0 ? U : 1];
    for (int64_t u = 0; u < U; u++) { /* softmax numerators, summed lane-wise then across lanes */
        float *st = s + u * nn;
        for (int64_t j = n[u]; j < nn; j++) st[j] = -INFINITY;
        vec t = top[u]; /* its lanes' maximum by halving */
        t = vmax(t, PICK(t, t, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
        t = vmax(t, PICK(t, t, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15));
        t = vmax(t, PICK(t, t, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        t = vmax(t, PICK(t, t, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        vec m = zero + t[0], sum = zero;
        for (int64_t j = 0; j < nn; j += LANES) {
            vec e = exp_neg(load(st + j) - m);
            store(st + j, e);
            sum += e;
        }
        total[u] = lane_sum(sum);
    }
    for (int64_t jb = 0; jb < most; jb += VBLOCK) { /* values, key after key, VBLOCK keys at a time */
        int64_t cnt = most - jb < VBLOCK ? most - jb : VBLOCK;
        const float *vp[VBLOCK];
        for (int64_t i = 0; i < cnt; i++) vp[i] = vb + key_slot(jb + i, lo, hi, ext) * ss;
        /* queries a few at a time, each value loaded once for them (their sums are independent chains, which
           also hides the adds' latency); the tile's size only interleaves the queries, each still sums alone */
        int64_t u = 0;
        if (D <= 4 * LANES) {
            for (; u + 4 <= U; u += 4) value_tile(4, u, n, jb, cnt, vp, s, nn, acc, D);
            if (U - u == 3) value_tile(3, u, n, jb, cnt, vp, s, nn, acc, D), u += 3;
            if (U - u == 2) value_tile(2, u, n, jb, cnt, vp, s, nn, acc, D), u += 2;
            if (U - u == 1) value_tile(1, u, n, jb, cnt, vp, s, nn, acc, D), u += 1;
        }
        for (; u < U; u++) { /* wider heads: one query at a time */
            if (jb >= n[u]) continue;
            int64_t c = n[u] - jb < cnt ? n[u] - jb : cnt;
            const float *pu = s + u * nn + jb;
            float *au = acc + u * D;
            vec a[D / LANES];
            for (int64_t k = 0; k < D / LANES; k++) a[k] = jb == 0 ? zero : load(au + k * LANES);
            for (int64_t i = 0; i < c; i++) {
                float p = pu[i];
                for (int64_t k = 0; k < D / LANES; k++) a[k] += p * load(vp[i] + k * LANES);
            }
            for (int64_t k = 0; k < D / LANES; k++) store(au + k * LANES, a[k]);
        }
    }
    for (int64_t u = 0; u < U; u++) {
        float *o = outs + (u / Gi) * qstride + (u % Gi) * D;
        for (int64_t d = 0; d < D; d++) o[d] = n[u] > 0 ? acc[u * D + d] / total[u] : 0.0f;
    }
}

/* Attention for the tokens `plan` lists (native.plan: a header of tokens, groups, most tokens in a group, most keys
   of a token, extra slots; then tok, groups and extra as above); tokens in no group (padding) get zeros. Returns 0,
   -1 when D is not a positive multiple of LANES, -2 when scratch memory cannot be had. */
int ponder_attend(const float *q, const float *k, const float *v, const int64_t *plan, float *out, int64_t sb,
                  int64_t sh, int64_t ss, int64_t Hkv, int64_t G, int64_t D, int threads) {
    if (D % LANES != 0 || D <= 0) return -1;
    int64_t N = plan[0], n_groups = plan[1], max_group = plan[2], max_keys = plan[3];
    const int64_t *tok = plan + 5, *groups = tok + 5 * N, *extra = groups + 2 * n_groups;
    const float scale = 1.0f / sqrtf((float)D);
    memset(out, 0, (size_t)(N * Hkv * G * D) * sizeof(float));
    int64_t nn = (max_keys + LANES - 1) / LANES * LANES, per_thread = max_group * G * (nn + D);
    /* work items: (group, KV head) with its G query heads together (each key loaded once for all of them), or, when
       that leaves threads idle (a one-row verify forward), (group, KV head, query head). A one-row decode step keeps
       its query heads together all the same: alone, a query's value sums are one chain of dependent adds, and G of
       them interleaved ran faster than the threads' even share of single chains (SmolLM2's 3 KV heads, 2 threads) */
    int64_t Gi = n_groups * Hkv >= 2 * threads || max_group == 1 ? G : 1, items = n_groups * Hkv * (G / Gi);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
    {
        float *s = malloc((size_t)per_thread * sizeof(float)); /* this thread's scores and value sums */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; i++) {
            if (s == NULL) {
                failed = 1;
                continue;
            }
            int64_t per_group = Hkv * (G / Gi);
            int64_t grp = i / per_group, h = (i % per_group) / (G / Gi), g0 = (i % (G / Gi)) * Gi;
            int64_t first = groups[2 * grp], T = groups[2 * grp + 1];
            const int64_t *m = tok + 5 * first;
            int64_t b = m[0], lo = m[1], n[T], most = 0;
            for (int64_t t = 0; t < T; t++) {
                n[t] = tok[5 * (first + t) + 2] - lo + tok[5 * (first + t) + 4];
                if (n[t] > most) most = n[t];
            }
            int64_t hi = T == 1 ? m[2] : lo + most; /* several tokens: a chain, every key a slot of [lo, lo + most) */
            const float *qs = q + ((first * Hkv + h) * G + g0) * D;
            float *outs = out + ((first * Hkv + h) * G + g0) * D;
            const float *kb = k + b * sb + h * sh, *vb = v + b * sb + h * sh;
            const int64_t *ext = extra + m[3];
            int64_t qstride = Hkv * G * D, U = T * Gi;
            if (D == 64)
                attend_group(qs, qstride, kb, vb, ss, lo, hi, ext, n, T, Gi, most, 64, scale, s, s + U * nn, outs);
            else if (D == 128)
                attend_group(qs, qstride, kb, vb, ss, lo, hi, ext, n, T, Gi, most, 128, scale, s, s + U * nn, outs);
            else
                attend_group(qs, qstride, kb, vb, ss, lo, hi, ext, n, T, Gi, most, D, scale, s, s + U * nn, outs);
        }
        free(s);
    }
    return failed ? -2 : 0;
}
