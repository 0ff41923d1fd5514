// Cross-entropy over one chunk of logits, for the chunked (fused) linear + cross-entropy.
//
// The lm-head matmul runs in cuBLAS on a chunk of tokens at a time (linear_cross_entropy.py);
// this kernel turns that chunk of logits into the per-token loss and, in the same launch, overwrites
// the logits in place with their gradient, so the (tokens x vocab) logits and their gradient never
// exist for more than one chunk:
//     lse       = log(sum_j exp(x_j))                  (one pass, online softmax, fp32)
//     loss      = lse - x_target                       (0 where target == ignore_index,
//                                                       NaN for a target outside [0, vocab))
//     logits_j <- (exp(x_j - lse) - [j == target]) * scale      (0 on ignored rows)
// where scale is grad_scale[row] (the upstream per-token gradient) or 1 when grad_scale is null.
//
// One block per row (token); any blockDim.x that is a multiple of 32, up to 1024. Rows are read in
// 16-byte accesses when the vocab size and alignment allow it; the second pass reads the row again,
// mostly from L2: a 32768-entry bf16 row is 64 KB, and with 512-thread blocks about 4 rows per SM
// are in flight (~34 MB on an H100, inside its 50 MB L2).
#include "common.h"

#define LCE_NEG_BIG (-3.402823466e+38f)  // -FLT_MAX: an empty softmax state (never inf - inf)

// Online softmax state of a set of values: m = their max, s = sum exp(x - m).
__device__ __forceinline__ void lce_combine(float& m, float& s, float m2, float s2) {
    const float M = fmaxf(m, m2);
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

__device__ __forceinline__ void lce_warp_combine(float& m, float& s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        lce_combine(m, s, m2, s2);
    }
}

// Block-wide combine of (m, s); every thread gets the same result.
__device__ __forceinline__ void lce_block_combine(float& m, float& s) {
    __shared__ float shared_m[32];
    __shared__ float shared_s[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    lce_warp_combine(m, s);
    if (lane == 0) {
        shared_m[warp] = m;
        shared_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = blockDim.x >> 5;
        m = lane < n_warps ? shared_m[lane] : LCE_NEG_BIG;
        s = lane < n_warps ? shared_s[lane] : 0.0f;
        lce_warp_combine(m, s);
        if (lane == 0) {
            shared_m[0] = m;
            shared_s[0] = s;
        }
    }
    __syncthreads();
    m = shared_m[0];
    s = shared_s[0];
}

// Pass 1 over a row in accesses of V elements: this thread's (max, sum exp) state.
template <class T, int V>
__device__ __forceinline__ void lce_row_state(const T* x, int vocab, float& m, float& s) {
    for (int j = threadIdx.x * V; j < vocab; j += blockDim.x * V) {
        float v[V];
        load_vec<V>(x + j, v);
        float vmax = v[0];
#pragma unroll
        for (int k = 1; k < V; k++) vmax = fmaxf(vmax, v[k]);
        if (vmax > m) {  // one rescale per access, not per element
            s *= expf(m - vmax);
            m = vmax;
        }
#pragma unroll
        for (int k = 0; k < V; k++) s += expf(v[k] - m);
    }
}

// Pass 2: the row's gradient, in place.
template <class T, int V>
__device__ __forceinline__ void lce_row_grad(T* x, int vocab, float lse, int hot, float scale) {
    for (int j = threadIdx.x * V; j < vocab; j += blockDim.x * V) {
        float v[V];
        load_vec<V>(x + j, v);
#pragma unroll
        for (int k = 0; k < V; k++) v[k] = (expf(v[k] - lse) - (j + k == hot ? 1.0f : 0.0f)) * scale;
        store_vec<V>(x + j, v);
    }
}

template <class T>
__device__ __forceinline__ void lce_row(T* __restrict__ logits, const long long* __restrict__ targets,
                                        float* __restrict__ loss, const float* __restrict__ grad_scale,
                                        int vocab, long long ignore_index, int write_grad) {
    constexpr int V = 16 / sizeof(T);
    const long long row = blockIdx.x;
    T* x = logits + row * vocab;
    const bool vectorized = vocab % V == 0 && reinterpret_cast<unsigned long long>(x) % 16 == 0;

    float m = LCE_NEG_BIG, s = 0.0f;
    if (vectorized) lce_row_state<T, V>(x, vocab, m, s);
    else lce_row_state<T, 1>(x, vocab, m, s);
    lce_block_combine(m, s);
    const float lse = m + logf(s);

    const long long target = targets[row];
    const bool ignored = target == ignore_index;
    const bool in_range = target >= 0 && target < vocab;
    if (loss != nullptr && threadIdx.x == 0)
        loss[row] = ignored ? 0.0f : in_range ? lse - to_float(x[target]) : __int_as_float(0x7fc00000);
    if (!write_grad) return;
    __syncthreads();  // x[target] is read above before any thread overwrites the row

    if (ignored) {  // no loss, no gradient
        const float zero[1] = {0.0f};
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) store_vec<1>(x + j, zero);
        return;
    }
    const float scale = grad_scale != nullptr ? grad_scale[row] : 1.0f;
    const int hot = in_range ? (int)target : -1;
    if (vectorized) lce_row_grad<T, V>(x, vocab, lse, hot, scale);
    else lce_row_grad<T, 1>(x, vocab, lse, hot, scale);
}

// logits: (gridDim.x, vocab) row-major, float or bf16; targets: (rows,) int64; loss: (rows,) fp32 or
// null; grad_scale: (rows,) fp32 or null (= 1); write_grad = 0 leaves the logits as they are.
extern "C" __global__ void __launch_bounds__(1024)
lce_chunk_f32(float* logits, const long long* targets, float* loss, const float* grad_scale,
              int vocab, long long ignore_index, int write_grad) {
    lce_row<float>(logits, targets, loss, grad_scale, vocab, ignore_index, write_grad);
}

extern "C" __global__ void __launch_bounds__(1024)
lce_chunk_bf16(bf16* logits, const long long* targets, float* loss, const float* grad_scale,
               int vocab, long long ignore_index, int write_grad) {
    lce_row<bf16>(logits, targets, loss, grad_scale, vocab, ignore_index, write_grad);
}
