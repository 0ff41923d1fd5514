// SwiGLU's elementwise part (see swiglu.py for the op and its reference):
//     out = silu(g) * u,  silu(g) = g * sigmoid(g)
// backward, with sg = sigmoid(g):
//     du = dout * silu(g),   dg = dout * u * sg * (1 + g * (1 - sg))
// gate and up are (rows, cols) with their own row strides (so they may be the two halves of
// one fused projection); outputs are contiguous. Block x walks the rows, block y and the
// threads the columns, V elements (16 bytes) per thread; math in fp32.
#include "common.h"

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <class T, int V>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up,
                                           T* __restrict__ out, int rows, int cols, long long g_stride,
                                           long long u_stride) {
    const int row = blockIdx.x;
    const int col = (blockIdx.y * blockDim.x + threadIdx.x) * V;
    if (row >= rows || col >= cols) return;
    float g[V], u[V], o[V];
    load_vec<V>(gate + row * g_stride + col, g);
    load_vec<V>(up + row * u_stride + col, u);
#pragma unroll
    for (int e = 0; e < V; e++) o[e] = g[e] * sigmoid(g[e]) * u[e];
    store_vec<V>(out + (long long)row * cols + col, o);
}

template <class T, int V>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ dout, const T* __restrict__ gate,
                                           const T* __restrict__ up, T* __restrict__ dgate, T* __restrict__ dup,
                                           int rows, int cols, long long g_stride, long long u_stride) {
    const int row = blockIdx.x;
    const int col = (blockIdx.y * blockDim.x + threadIdx.x) * V;
    if (row >= rows || col >= cols) return;
    const long long o = (long long)row * cols + col;
    float d[V], g[V], u[V], dg[V], du[V];
    load_vec<V>(dout + o, d);
    load_vec<V>(gate + row * g_stride + col, g);
    load_vec<V>(up + row * u_stride + col, u);
#pragma unroll
    for (int e = 0; e < V; e++) {
        const float sg = sigmoid(g[e]);
        du[e] = d[e] * (g[e] * sg);
        dg[e] = d[e] * u[e] * (sg * (1.0f + g[e] * (1.0f - sg)));
    }
    store_vec<V>(dgate + o, dg);
    store_vec<V>(dup + o, du);
}

#define SWIGLU_KERNELS(NAME, T, V)                                                                           \
    extern "C" __global__ void swiglu_fwd_##NAME(const T* gate, const T* up, T* out, int rows, int cols,    \
                                                 long long g_stride, long long u_stride) {                  \
        swiglu_fwd<T, V>(gate, up, out, rows, cols, g_stride, u_stride);                                   \
    }                                                                                                        \
    extern "C" __global__ void swiglu_bwd_##NAME(const T* dout, const T* gate, const T* up, T* dgate,      \
                                                 T* dup, int rows, int cols, long long g_stride,           \
                                                 long long u_stride) {                                      \
        swiglu_bwd<T, V>(dout, gate, up, dgate, dup, rows, cols, g_stride, u_stride);                      \
    }

SWIGLU_KERNELS(f32_v4, float, 4)
SWIGLU_KERNELS(f32_v1, float, 1)
SWIGLU_KERNELS(bf16_v8, bf16, 8)
SWIGLU_KERNELS(bf16_v1, bf16, 1)
