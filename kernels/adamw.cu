// AdamW over many tensors in one launch (multi-tensor apply, as apex and torch's _foreach do).
//
// A launch covers a list of tensors that share hyper-parameters, dtype and step count (usually
// one param group). The tensors are cut into chunks of `chunk_size` elements and each block updates
// one chunk; `meta` (int64, copied to the device once per launch) says where everything is:
//     meta[0*T + t]  param pointer      (float or bf16)
//     meta[1*T + t]  grad pointer       (same dtype as the param)
//     meta[2*T + t]  exp_avg pointer    (float32)
//     meta[3*T + t]  exp_avg_sq pointer (float32)
//     meta[4*T + t]  number of elements
//     meta[5*T + t]  index of the tensor's first chunk; meta[6*T] = total chunks (= gridDim.x)
//
// Math in fp32, in the order torch.optim.AdamW's single-tensor and foreach paths use:
//     p = p * decay                                  decay = 1 - lr * wd            (host, double)
//     m = m + (1 - beta1) * (g - m)                  torch's exp_avg.lerp_(grad, 1 - beta1)
//     v = v * beta2 + (1 - beta2) * g * g            torch's mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//     p = p + neg_step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with neg_step_size = -lr / (1 - beta1^step) and bc2_sqrt = sqrt(1 - beta2^step), computed on the
// host in double like torch does. lr changes every step, so every lr-dependent number is a kernel
// argument, never device state.
#include "common.h"

#define ADAMW_VEC 4  // elements per thread per access: 16 bytes of fp32 state

struct AdamWHyper {
    float decay, beta1_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps;
};

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWHyper& h) {
    p = p * h.decay;
    m = m + h.beta1_weight * (g - m);
    v = v * h.beta2 + h.one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / h.bc2_sqrt + h.eps;
    p = p + h.neg_step_size * m / denom;
}

template <class T, int V>
__device__ __forceinline__ void adamw_access(T* param, const T* grad, float* exp_avg, float* exp_avg_sq,
                                             const AdamWHyper& h) {
    float p[V], g[V], m[V], v[V];
    load_vec<V>(param, p);
    load_vec<V>(grad, g);
    load_vec<V>(exp_avg, m);
    load_vec<V>(exp_avg_sq, v);
#pragma unroll
    for (int k = 0; k < V; k++) adamw_element(p[k], g[k], m[k], v[k], h);
    store_vec<V>(param, p);
    store_vec<V>(exp_avg, m);
    store_vec<V>(exp_avg_sq, v);
}

__device__ __forceinline__ bool adamw_aligned(const void* p, int bytes) {
    return reinterpret_cast<unsigned long long>(p) % bytes == 0;
}

template <class T>
__device__ __forceinline__ void adamw_chunk(const long long* __restrict__ meta, int n_tensors,
                                            long long chunk_size, const AdamWHyper& h) {
    // This block's tensor: the last t whose first chunk is <= blockIdx.x.
    const long long* first_chunk = meta + 5 * (long long)n_tensors;
    const long long block = blockIdx.x;
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (first_chunk[mid] <= block) lo = mid;
        else hi = mid - 1;
    }
    T* param = reinterpret_cast<T*>(meta[lo]);
    const T* grad = reinterpret_cast<const T*>(meta[n_tensors + lo]);
    float* exp_avg = reinterpret_cast<float*>(meta[2 * n_tensors + lo]);
    float* exp_avg_sq = reinterpret_cast<float*>(meta[3 * n_tensors + lo]);
    const long long numel = meta[4 * n_tensors + lo];
    const long long begin = (block - first_chunk[lo]) * chunk_size;
    const long long end = begin + chunk_size < numel ? begin + chunk_size : numel;

    // chunk_size is a multiple of ADAMW_VEC, so every access of a chunk keeps its tensor's alignment.
    const bool aligned = adamw_aligned(param, ADAMW_VEC * sizeof(T)) && adamw_aligned(grad, ADAMW_VEC * sizeof(T))
                         && adamw_aligned(exp_avg, 16) && adamw_aligned(exp_avg_sq, 16);
    for (long long i = begin + (long long)threadIdx.x * ADAMW_VEC; i < end; i += (long long)blockDim.x * ADAMW_VEC) {
        if (aligned && i + ADAMW_VEC <= end) {
            adamw_access<T, ADAMW_VEC>(param + i, grad + i, exp_avg + i, exp_avg_sq + i, h);
        } else {  // a tensor's ragged end, or pointers that are not aligned: one element at a time
            for (long long j = i; j < i + ADAMW_VEC && j < end; j++)
                adamw_access<T, 1>(param + j, grad + j, exp_avg + j, exp_avg_sq + j, h);
        }
    }
}

#define ADAMW_KERNEL(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(1024)                                                 \
    adamw_##NAME(const long long* meta, int n_tensors, long long chunk_size, float decay,              \
                 float beta1_weight, float beta2, float one_minus_beta2, float neg_step_size,          \
                 float bc2_sqrt, float eps) {                                                          \
        const AdamWHyper h{decay, beta1_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps}; \
        adamw_chunk<T>(meta, n_tensors, chunk_size, h);                                                \
    }

ADAMW_KERNEL(f32, float)
ADAMW_KERNEL(bf16, bf16)
