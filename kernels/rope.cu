// Rotary position embedding on q and k in one launch (see rope.py for the op and its reference).
//
// q: (B, T, H, D), k: (B, T, Hk, D), each token's heads contiguous, tokens `q_stride` / `k_stride`
// elements apart (so q and k may be views into one fused qkv projection); cos, sin: (T, D/2) fp32.
// With half = D/2, pair p of a head rotates (x[p], x[p + half]):
//     out[p] = x[p] * cos - x[p + half] * sin,   out[p + half] = x[p + half] * cos + x[p] * sin
// The backward is the rotation by the opposite angle, the same kernel with sign = -1 (sin -> -sin).
//
// Thread (x, y, z) of a block: x picks V consecutive pairs, z a token of the block, y a group of
// heads; a thread reads its cos/sin once and applies them to every head of q and k it owns
// (heads y, y + blockDim.y, ...). Outputs are contiguous (B, T, H, D) and (B, T, Hk, D).
#include "common.h"

template <class T, int V>
__device__ __forceinline__ void rope(const T* __restrict__ q, const T* __restrict__ k,
                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                     T* __restrict__ q_out, T* __restrict__ k_out, int tokens, int seq_len,
                                     int H, int Hk, int half, long long q_stride, long long k_stride, float sign) {
    const int token = blockIdx.x * blockDim.z + threadIdx.z;
    const int p = threadIdx.x * V;
    if (token >= tokens || p >= half) return;  // no barriers in this kernel
    const int t = token % seq_len;
    float c[V], s[V];
    load_vec<V>(cos_t + (long long)t * half + p, c);
    load_vec<V>(sin_t + (long long)t * half + p, s);
#pragma unroll
    for (int e = 0; e < V; e++) s[e] *= sign;
    const int D = 2 * half;
#pragma unroll 4
    for (int head = threadIdx.y; head < H + Hk; head += blockDim.y) {
        const bool is_q = head < H;
        const T* src = is_q ? q + token * q_stride + (long long)head * D : k + token * k_stride + (long long)(head - H) * D;
        T* dst = is_q ? q_out + ((long long)token * H + head) * D : k_out + ((long long)token * Hk + head - H) * D;
        float x1[V], x2[V], o1[V], o2[V];
        load_vec<V>(src + p, x1);
        load_vec<V>(src + half + p, x2);
#pragma unroll
        for (int e = 0; e < V; e++) {
            o1[e] = x1[e] * c[e] - x2[e] * s[e];
            o2[e] = x2[e] * c[e] + x1[e] * s[e];
        }
        store_vec<V>(dst + p, o1);
        store_vec<V>(dst + half + p, o2);
    }
}

#define ROPE_KERNEL(NAME, T, V)                                                                            \
    extern "C" __global__ void rope_##NAME(const T* q, const T* k, const float* cos_t, const float* sin_t, \
                                           T* q_out, T* k_out, int tokens, int seq_len, int H, int Hk,    \
                                           int half, long long q_stride, long long k_stride, float sign) { \
        rope<T, V>(q, k, cos_t, sin_t, q_out, k_out, tokens, seq_len, H, Hk, half, q_stride, k_stride, sign); \
    }

ROPE_KERNEL(f32_v4, float, 4)
ROPE_KERNEL(f32_v1, float, 1)
ROPE_KERNEL(bf16_v8, bf16, 8)
ROPE_KERNEL(bf16_v1, bf16, 1)
