// RMSNorm with the residual add fused in (see rmsnorm.py for the op and its reference).
//
// Forward, one warp per row:  h = x + delta (rounded to T, the residual stream's dtype)
//                             r = rsqrt(mean(h^2) + eps);  y = (h * r) * w;  rstd[row] = r
// Backward, with g = dy * w and s = sum_j g_j h_j over the row:
//     dh_total = dh + r * (g - h * r^2 * s / C)       (dh: the residual's own gradient, may be null)
//     dw       = sum over rows of dy * (h * r)        (per-block partial sums, then rmsnorm_dw_reduce)
// All math in fp32. V is the number of elements per 16-byte access (4 fp32, 8 bf16), or 1 for
// rows whose length or alignment does not allow vectors. A row of up to 1024 elements stays in
// registers between the two passes over it; longer rows are read twice.
#include "common.h"

#define CACHED 32  // elements per lane held in registers: rows of up to 32 * 32 = 1024

// T: x, h and y; D: delta (T, or bf16 under a float32 residual stream). delta may be null (then
// h = x and h_out is not written). x and delta may have a row stride; the outputs are contiguous.
template <class T, class D, int V>
__device__ __forceinline__ void add_rmsnorm_fwd(const T* __restrict__ x, const D* __restrict__ delta,
                                                const float* __restrict__ w, T* __restrict__ h_out,
                                                T* __restrict__ y, float* __restrict__ rstd, int rows, int C,
                                                long long x_stride, long long delta_stride, float eps) {
    constexpr int NV = CACHED / V;  // vectors per lane held in registers
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp leaves together; there is no block barrier
    const T* xr = x + row * x_stride;
    const D* dr = delta ? delta + row * delta_stride : nullptr;
    T* hr = dr ? h_out + (long long)row * C : nullptr;
    T* yr = y + (long long)row * C;
    const int nvec = C / V;
    float sumsq = 0.f;

    if (nvec <= NV * 32) {
        float hv[NV][V];
#pragma unroll
        for (int i = 0; i < NV; i++) {
            const int j = i * 32 + lane;
            if (j < nvec) {
                load_vec<V>(xr + j * V, hv[i]);
                if (dr) {
                    float d[V];
                    load_vec<V>(dr + j * V, d);
#pragma unroll
                    for (int e = 0; e < V; e++) hv[i][e] = round_to<T>(hv[i][e] + d[e]);
                    store_vec<V>(hr + j * V, hv[i]);
                }
#pragma unroll
                for (int e = 0; e < V; e++) sumsq += hv[i][e] * hv[i][e];
            }
        }
        const float r = rsqrtf(warp_sum(sumsq) / C + eps);
#pragma unroll
        for (int i = 0; i < NV; i++) {
            const int j = i * 32 + lane;
            if (j < nvec) {
                float wv[V], out[V];
                load_vec<V>(w + j * V, wv);
#pragma unroll
                for (int e = 0; e < V; e++) out[e] = (hv[i][e] * r) * wv[e];
                store_vec<V>(yr + j * V, out);
            }
        }
        if (lane == 0) rstd[row] = r;
        return;
    }

    // A long row: the first pass writes h, the second reads it back (from L2, written by this
    // same lane: a lane handles the same columns in both passes).
    for (int j = lane; j < nvec; j += 32) {
        float a[V];
        load_vec<V>(xr + j * V, a);
        if (dr) {
            float d[V];
            load_vec<V>(dr + j * V, d);
#pragma unroll
            for (int e = 0; e < V; e++) a[e] = round_to<T>(a[e] + d[e]);
            store_vec<V>(hr + j * V, a);
        }
#pragma unroll
        for (int e = 0; e < V; e++) sumsq += a[e] * a[e];
    }
    const float r = rsqrtf(warp_sum(sumsq) / C + eps);
    const T* src = dr ? hr : xr;
    for (int j = lane; j < nvec; j += 32) {
        float a[V], wv[V], out[V];
        load_vec<V>(src + j * V, a);
        load_vec<V>(w + j * V, wv);
#pragma unroll
        for (int e = 0; e < V; e++) out[e] = (a[e] * r) * wv[e];
        store_vec<V>(yr + j * V, out);
    }
    if (lane == 0) rstd[row] = r;
}

// Backward helpers for one vector of V elements of a row (h and dy as stored).
// Adds dy * (h * r) into this lane's dw accumulator and returns this vector's share of sum(dy*w*h).
template <class T, int V>
__device__ __forceinline__ float bwd_accumulate(const T* hr, const T* dyr, const float* w, float* acc, float r) {
    float wv[V], a[V], dot = 0.f;
    load_vec<V>(w, wv);
    load_vec<V>(acc, a);
#pragma unroll
    for (int e = 0; e < V; e++) {
        const float hv = to_float(hr[e]), dyv = to_float(dyr[e]);
        dot += dyv * wv[e] * hv;
        a[e] += dyv * (hv * r);
    }
    store_vec<V>(acc, a);
    return dot;
}

// dx = dh + r * (dy * w - h * c)
template <class T, int V>
__device__ __forceinline__ void bwd_write_dx(const T* hr, const T* dyr, const float* w, const T* dh, T* dx,
                                             float r, float c) {
    float wv[V], out[V];
    load_vec<V>(w, wv);
    if (dh) {
        load_vec<V>(dh, out);
    } else {
#pragma unroll
        for (int e = 0; e < V; e++) out[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < V; e++) out[e] += r * (to_float(dyr[e]) * wv[e] - to_float(hr[e]) * c);
    store_vec<V>(dx, out);
}

// One warp per row over a grid-stride loop of rows (the grid is sized to the GPU, not the rows).
// Each warp accumulates dw for its rows in its own row of shared memory, where each lane owns
// its columns (no atomics, no races); the block then writes the sum of its warps' rows to
// dw_partial[blockIdx.x]. Dynamic shared memory: (blockDim.x / 32) * C floats.
template <class T, int V>
__device__ __forceinline__ void add_rmsnorm_bwd(const T* __restrict__ dy, const T* __restrict__ dh,
                                                const T* __restrict__ h, const float* __restrict__ w,
                                                const float* __restrict__ rstd, T* __restrict__ dx,
                                                float* __restrict__ dw_partial, int rows, int C) {
    extern __shared__ float4 smem_f4[];
    float* const acc_all = reinterpret_cast<float*>(smem_f4);
    constexpr int NV = CACHED / V;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* acc = acc_all + warp * C;
    const int nvec = C / V;
    const float zero[V] = {};
    for (int j = lane; j < nvec; j += 32) store_vec<V>(acc + j * V, zero);
    const float inv_c = 1.0f / C;

    for (int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
        const long long off = (long long)row * C;
        const float r = rstd[row];
        const T* dhr = dh ? dh + off : nullptr;
        float dot = 0.f;
        if (nvec <= NV * 32) {
            T hraw[NV][V], dyraw[NV][V];  // the row as stored: half the registers for bf16
#pragma unroll
            for (int i = 0; i < NV; i++) {
                const int j = i * 32 + lane;
                if (j < nvec) {
                    load_raw<V>(h + off + j * V, hraw[i]);
                    load_raw<V>(dy + off + j * V, dyraw[i]);
                    dot += bwd_accumulate<T, V>(hraw[i], dyraw[i], w + j * V, acc + j * V, r);
                }
            }
            const float c = r * r * warp_sum(dot) * inv_c;
#pragma unroll
            for (int i = 0; i < NV; i++) {
                const int j = i * 32 + lane;
                if (j < nvec)
                    bwd_write_dx<T, V>(hraw[i], dyraw[i], w + j * V, dhr ? dhr + j * V : nullptr, dx + off + j * V, r, c);
            }
        } else {  // a long row: read h and dy twice
            for (int j = lane; j < nvec; j += 32) {
                T hr_[V], dyr_[V];
                load_raw<V>(h + off + j * V, hr_);
                load_raw<V>(dy + off + j * V, dyr_);
                dot += bwd_accumulate<T, V>(hr_, dyr_, w + j * V, acc + j * V, r);
            }
            const float c = r * r * warp_sum(dot) * inv_c;
            for (int j = lane; j < nvec; j += 32) {
                T hr_[V], dyr_[V];
                load_raw<V>(h + off + j * V, hr_);
                load_raw<V>(dy + off + j * V, dyr_);
                bwd_write_dx<T, V>(hr_, dyr_, w + j * V, dhr ? dhr + j * V : nullptr, dx + off + j * V, r, c);
            }
        }
    }
    __syncthreads();
    // this block's dw partial: the sum of its warps' accumulators, in a fixed order
    for (int col = threadIdx.x; col < C; col += blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < warps; k++) s += acc_all[k * C + col];
        dw_partial[(long long)blockIdx.x * C + col] = s;
    }
}

// dw[col] = sum over the parts of partial[part, col]. Block (32, 32): threadIdx.x a column of the
// block's 32 (coalesced rows of 128 bytes), threadIdx.y every 32nd part; then a fixed-order sum
// over threadIdx.y in shared memory, so the result does not depend on scheduling.
extern "C" __global__ void rmsnorm_dw_reduce(const float* __restrict__ partial, float* __restrict__ dw,
                                             int parts, int C) {
    __shared__ float sums[32][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (col < C) {
#pragma unroll 8
        for (int p = threadIdx.y; p < parts; p += blockDim.y) s += partial[(long long)p * C + col];
    }
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        float total = 0.f;
        for (int k = 0; k < (int)blockDim.y; k++) total += sums[k][threadIdx.x];
        dw[col] = total;
    }
}

#define RMSNORM_FWD(NAME, T, D, V)                                                                          \
    extern "C" __global__ void add_rmsnorm_fwd_##NAME(const T* x, const D* delta, const float* w, T* h_out, \
                                                      T* y, float* rstd, int rows, int C,                 \
                                                      long long x_stride, long long delta_stride,         \
                                                      float eps) {                                        \
        add_rmsnorm_fwd<T, D, V>(x, delta, w, h_out, y, rstd, rows, C, x_stride, delta_stride, eps);     \
    }
#define RMSNORM_BWD(NAME, T, V)                                                                             \
    extern "C" __global__ void add_rmsnorm_bwd_##NAME(const T* dy, const T* dh, const T* h, const float* w, \
                                                      const float* rstd, T* dx, float* dw_partial,        \
                                                      int rows, int C) {                                  \
        add_rmsnorm_bwd<T, V>(dy, dh, h, w, rstd, dx, dw_partial, rows, C);                              \
    }

RMSNORM_FWD(f32_v4, float, float, 4)
RMSNORM_FWD(f32_v1, float, float, 1)
RMSNORM_FWD(bf16_v8, bf16, bf16, 8)
RMSNORM_FWD(bf16_v1, bf16, bf16, 1)
RMSNORM_FWD(f32_bf16_v4, float, bf16, 4)  // float32 residual stream, bf16 delta (autocast)
RMSNORM_FWD(f32_bf16_v1, float, bf16, 1)
RMSNORM_BWD(f32_v4, float, 4)
RMSNORM_BWD(f32_v1, float, 1)
RMSNORM_BWD(bf16_v8, bf16, 8)
RMSNORM_BWD(bf16_v1, bf16, 1)
