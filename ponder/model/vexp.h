/* The vector exp of ponder's C kernels (attention.c's softmax, decoder.c's SwiGLU): 16 float lanes. */
#ifndef PONDER_VEXP_H
#define PONDER_VEXP_H

#include <stdint.h>

typedef float v16sf __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t v16si __attribute__((vector_size(16 * sizeof(int32_t))));

/* exp(x) lane-wise given an integer k with |x - k ln2| <= ln2 / 2 (the caller rounds x / ln2, and keeps x within
   [-87, 88] so that k + 127 is a normal exponent): exp(x - k ln2) by its degree-6 Taylor polynomial (relative
   error < 2e-7), times 2^k set in the exponent bits. */
static inline v16sf exp_scaled(v16sf x, v16si k) {
    const v16sf zero = {0};
    v16sf kf = __builtin_convertvector(k, v16sf);
    v16sf r = x - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;
    v16sf p = zero + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (v16sf)((k + 127) << 23);
}

#endif
