// common.h - helpers shared by the kernel files (included with -I kernels/).
//
// bf16 is our own 2-byte storage type rather than CUDA's __nv_bfloat16: <cuda_bf16.h> is not
// redistributable, so CuPy's NVRTC builds often cannot find it; these few lines need no header.
// The conversions round to nearest even, the GPU instruction on sm_80+ and plain C++ elsewhere
// (the CPU emulation in kernels/emulation/).
#pragma once

struct __align__(2) bf16 {
    unsigned short bits;
};
#ifdef __CUDA_EMU__
WBEMU_TYPE_CODE(bf16, "bf16")
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
    bf16 r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = 0x7fff;  // NaN, as the GPU instruction gives
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        r.bits = (unsigned short)(u >> 16);
    }
#endif
    return r;
}
// x rounded to T's precision, as a float (what a value stored in T and read back would be).
template <class T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// Load/store N consecutive elements of T as floats, in the widest accesses that divide
// N * sizeof(T) (16, 8 or 4 bytes; the pointer must be aligned to that width) or one by one.
template <int BYTES> struct Raw;
template <> struct Raw<16> { typedef uint4 type; };
template <> struct Raw<8> { typedef uint2 type; };
template <> struct Raw<4> { typedef unsigned type; };
template <int N, class T> __host__ __device__ constexpr int access_bytes() {
    return (N * sizeof(T)) % 16 == 0 ? 16 : (N * sizeof(T)) % 8 == 0 ? 8 : (N * sizeof(T)) % 4 == 0 ? 4 : 0;
}

// The union keeps the element array aligned for the wide accesses.
template <int N, class T> __device__ __forceinline__ void load_raw(const T* p, T* out) {
    constexpr int B = access_bytes<N, T>();
    if constexpr (B > 0) {
        typedef typename Raw<B>::type R;
        union { R r[N * sizeof(T) / B]; T t[N]; } u;
#pragma unroll
        for (int c = 0; c < (int)(N * sizeof(T) / B); c++) u.r[c] = reinterpret_cast<const R*>(p)[c];
#pragma unroll
        for (int i = 0; i < N; i++) out[i] = u.t[i];
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) out[i] = p[i];
    }
}

template <int N, class T> __device__ __forceinline__ void load_vec(const T* p, float* out) {
    T raw[N];
    load_raw<N>(p, raw);
#pragma unroll
    for (int i = 0; i < N; i++) out[i] = to_float(raw[i]);
}

template <int N, class T> __device__ __forceinline__ void store_vec(T* p, const float* in) {
    constexpr int B = access_bytes<N, T>();
    if constexpr (B > 0) {
        typedef typename Raw<B>::type R;
        union { R r[N * sizeof(T) / B]; T t[N]; } u;
#pragma unroll
        for (int i = 0; i < N; i++) u.t[i] = from_float<T>(in[i]);
#pragma unroll
        for (int c = 0; c < (int)(N * sizeof(T) / B); c++) reinterpret_cast<R*>(p)[c] = u.r[c];
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) p[i] = from_float<T>(in[i]);
    }
}

// The sum of v over the 32 lanes of a full warp, in every lane (the same tree in every lane,
// so the result is bitwise identical across lanes).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
