// cuda_emu.h - run CUDA C kernels on the CPU, for testing without a GPU.
//
// harness.py compiles a kernel file as C++ with `g++ -include cuda_emu.h -I kernels/emulation`,
// so the same .cu source that nvcc builds runs here unchanged. Each thread of a block is a
// fiber (its own small stack) on one OS thread; fibers switch only at __syncthreads and at
// warp operations (shuffles, ballots, __syncwarp), so a block runs as a sequence of
// barrier-to-barrier phases. Within a phase the threads run one after another in the order
// the launch's schedule says (forward, reverse or a fresh random permutation per phase):
// code that is only correct in one order - a missing __syncthreads, a read of another
// thread's value before it is written - gives different results under different schedules,
// which is how the tests catch races. Warp operations follow the PTX `shfl.sync` rules exactly
// and report misuse (a mask without the caller, a source lane outside the mask, lanes that
// exited, lanes that disagree on the mask) as errors instead of undefined values. Shared memory
// (static and dynamic) is filled with 0xFF bytes (NaN for float and bf16) before every block.
//
// Only correctness is emulated, not speed: one block at a time, launches serialised.

#pragma once
#define __CUDA_EMU__ 1

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __grid_constant__
#define __managed__
// Static __shared__ variables live in one section so the runtime can poison them per block.
// (`extern __shared__ T name[];` is rewritten by harness.py into a pointer to the dynamic buffer.)
#define __shared__ static __attribute__((section("wbemu_shared")))

// ---------------------------------------------------------------- vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define WBEMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N { T x, y; }; \
    inline N make_##N(T x, T y) { return N{x, y}; }
#define WBEMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N { T x, y, z, w; }; \
    inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
WBEMU_VEC2(float, float2, 8)
WBEMU_VEC4(float, float4, 16)
WBEMU_VEC2(int, int2, 8)
WBEMU_VEC4(int, int4, 16)
WBEMU_VEC2(unsigned, uint2, 8)
WBEMU_VEC4(unsigned, uint4, 16)
WBEMU_VEC2(unsigned short, ushort2, 4)
WBEMU_VEC4(unsigned short, ushort4, 8)
WBEMU_VEC4(unsigned char, uchar4, 4)
WBEMU_VEC2(double, double2, 16)
WBEMU_VEC2(long long, longlong2, 16)
#undef WBEMU_VEC2
#undef WBEMU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// The built-in variables: globals that the scheduler sets before it resumes each thread.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- math
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(1.0f, std::max(0.0f, x)); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
// CUDA's overloaded min/max in the global namespace.
#define WBEMU_MINMAX(T) inline T min(T a, T b) { return a < b ? a : b; } \
    inline T max(T a, T b) { return a > b ? a : b; }
WBEMU_MINMAX(int)
WBEMU_MINMAX(unsigned)
WBEMU_MINMAX(long)
WBEMU_MINMAX(unsigned long)
WBEMU_MINMAX(long long)
WBEMU_MINMAX(unsigned long long)
#undef WBEMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }

// Cache-hinted loads and stores are plain accesses here.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline long long clock64() { return 0; }
inline int __nanosleep(unsigned) { return 0; }

// Atomics: threads never run at the same time here, so a plain read-modify-write is atomic.
#define WBEMU_ATOMIC(T) \
    inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; } \
    inline T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; } \
    inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; } \
    inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; } \
    inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; } \
    inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
WBEMU_ATOMIC(int)
WBEMU_ATOMIC(unsigned)
WBEMU_ATOMIC(unsigned long long)
WBEMU_ATOMIC(long long)
#undef WBEMU_ATOMIC
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline float atomicExch(float* p, float v) { float o = *p; *p = v; return o; }
inline float atomicMax(float* p, float v) { float o = *p; *p = std::fmax(o, v); return o; }
inline float atomicMin(float* p, float v) { float o = *p; *p = std::fmin(o, v); return o; }
#define WBEMU_ATOMIC_BITS(T) \
    inline T atomicAnd(T* p, T v) { T o = *p; *p = o & v; return o; } \
    inline T atomicOr(T* p, T v) { T o = *p; *p = o | v; return o; } \
    inline T atomicXor(T* p, T v) { T o = *p; *p = o ^ v; return o; }
WBEMU_ATOMIC_BITS(int)
WBEMU_ATOMIC_BITS(unsigned)
WBEMU_ATOMIC_BITS(unsigned long long)
#undef WBEMU_ATOMIC_BITS
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd

// ---------------------------------------------------------------- the scheduler
namespace emu {

enum class State : unsigned char { Runnable, AtBarrier, AtWarp, Done };
enum class WarpKind : unsigned char { Shfl, Ballot, Any, All, Sync, Match };
enum ShflMode { ShflIdx = 0, ShflUp = 1, ShflDown = 2, ShflBfly = 3 };
enum BarrierKind { BarPlain = 0, BarCount = 1, BarAnd = 2, BarOr = 3 };
enum Schedule { Forward = 0, Reverse = 1, Random = 2 };

struct Fiber {
    void* sp = nullptr;
    State state = State::Done;
    unsigned linear = 0;  // linear thread index in the block
    uint3 tid{0, 0, 0};
    // the warp operation it waits at
    WarpKind kind = WarpKind::Sync;
    int mode = 0, arg = 0, width = 32, pred = 0, bar = 0;
    unsigned mask = 0;
    unsigned long long value = 0, result = 0;
    const char* what = "";
};

struct Launch {
    void (*thunk)(void**) = nullptr;
    void** args = nullptr;
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    void* scheduler_sp = nullptr;
    bool failed = false;
    std::string error;
};

inline Launch g_launch;
inline std::mutex g_mutex;
inline std::string g_last_error;
inline constexpr size_t kMaxDynamicShared = 232448;  // the H100's per-block maximum (227 KB)
alignas(128) inline unsigned char g_dynamic_shared[kMaxDynamicShared];
inline void* dynamic_smem() { return g_dynamic_shared; }

#ifndef WBEMU_STACK_BYTES
#define WBEMU_STACK_BYTES (128 * 1024)
#endif
inline std::vector<unsigned char*> g_stacks;  // one per thread slot, each below a guard page

inline unsigned char* stack_for(size_t i) {
    static const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    while (g_stacks.size() <= i) {
        size_t bytes = WBEMU_STACK_BYTES + page;
        void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
        g_stacks.push_back(static_cast<unsigned char*>(m) + page);
    }
    return g_stacks[i];
}

}  // namespace emu

extern "C" char __start_wbemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_wbemu_shared[] __attribute__((weak, visibility("hidden")));

extern "C" __attribute__((visibility("hidden"), used, noinline)) void wbemu_fiber_main(emu::Fiber* f);

#if defined(__x86_64__) && !defined(WBEMU_USE_UCONTEXT)
// A minimal context switch (callee-saved registers, SSE and x87 control words): ~10 ns,
// where swapcontext makes a system call for the signal mask on every switch.
extern "C" void wbemu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden wbemu_switch
    .globl wbemu_switch
    .type wbemu_switch, @function
wbemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size wbemu_switch, .-wbemu_switch

    .p2align 4
    .hidden wbemu_trampoline
    .globl wbemu_trampoline
    .type wbemu_trampoline, @function
wbemu_trampoline:
    movq %r12, %rdi
    call wbemu_fiber_main
    ud2
    .size wbemu_trampoline, .-wbemu_trampoline
)");
extern "C" void wbemu_trampoline();

namespace emu {
inline void* init_stack(unsigned char* base, Fiber* f) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + WBEMU_STACK_BYTES) & ~uintptr_t(15);
    uint64_t* s = reinterpret_cast<uint64_t*>(top);
    s[-1] = reinterpret_cast<uint64_t>(&wbemu_trampoline);  // `ret` lands here with rsp 16-aligned
    s[-2] = 0;                                                // rbp
    s[-3] = 0;                                                // rbx
    s[-4] = reinterpret_cast<uint64_t>(f);                    // r12: the fiber
    s[-5] = s[-6] = s[-7] = 0;                                // r13, r14, r15
    uint32_t mxcsr = __builtin_ia32_stmxcsr();
    uint16_t fcw;
    asm volatile("fnstcw %0" : "=m"(fcw));
    uint32_t* ctl = reinterpret_cast<uint32_t*>(&s[-8]);
    ctl[0] = mxcsr;
    ctl[1] = fcw;
    return &s[-8];
}
inline void switch_to(void** save, void* load) { wbemu_switch(save, load); }
}  // namespace emu

#else  // portable fallback
#include <ucontext.h>
namespace emu {
struct UContexts {
    std::vector<ucontext_t> fiber;
    ucontext_t scheduler;
};
inline UContexts g_uctx;
inline void ucontext_entry(unsigned hi, unsigned lo) {
    wbemu_fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
inline void* init_stack(unsigned char* base, Fiber* f) {
    size_t i = f->linear;
    if (g_uctx.fiber.size() <= i) g_uctx.fiber.resize(i + 1);
    ucontext_t* c = &g_uctx.fiber[i];
    getcontext(c);
    c->uc_stack.ss_sp = base;
    c->uc_stack.ss_size = WBEMU_STACK_BYTES;
    c->uc_link = nullptr;
    uintptr_t p = reinterpret_cast<uintptr_t>(f);
    makecontext(c, reinterpret_cast<void (*)()>(&ucontext_entry), 2, unsigned(p >> 32), unsigned(p & 0xffffffffu));
    return c;
}
// `save` points at the caller's slot (a fiber's sp or scheduler_sp); a slot holds its ucontext_t*.
inline void switch_to(void** save, void* load) {
    ucontext_t* mine = (save == &g_launch.scheduler_sp) ? &g_uctx.scheduler
                                                          : &g_uctx.fiber[g_launch.current->linear];
    *save = mine;
    swapcontext(mine, static_cast<ucontext_t*>(load));
}
}  // namespace emu
#endif

namespace emu {

// From a thread: give control back to the scheduler until it resumes this thread.
inline void yield() {
    Fiber* f = g_launch.current;
    switch_to(&f->sp, g_launch.scheduler_sp);
}

// From a thread: stop the launch with an error; never returns.
[[noreturn]] inline void fail(const std::string& msg) {
    Launch& L = g_launch;
    if (!L.failed) {
        L.failed = true;
        char where[160];
        std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", blockIdx.x, blockIdx.y,
                      blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
        L.error = msg + where;
    }
    for (;;) yield();  // the scheduler never resumes a failed launch
}

inline unsigned lane_of(const Fiber* f) { return f->linear & 31u; }

inline void block_barrier(int kind, int pred) {
    Fiber* f = g_launch.current;
    f->bar = kind;
    f->pred = pred;
    f->state = State::AtBarrier;
    yield();
}

template <class T>
inline T warp_op(WarpKind kind, const char* what, unsigned mask, T value, int mode = 0, int arg = 0,
                 int width = 32, int pred = 0) {
    static_assert(sizeof(T) <= 8, "warp operations move at most 8 bytes");
    Fiber* f = g_launch.current;
    unsigned lane = lane_of(f);
    if (!((mask >> lane) & 1u)) {
        char b[160];
        std::snprintf(b, sizeof b, "%s: mask 0x%08x does not include the calling lane %u", what, mask, lane);
        fail(b);
    }
    if (width < 1 || width > 32 || (width & (width - 1))) {
        char b[120];
        std::snprintf(b, sizeof b, "%s: width %d is not a power of two in [1, 32]", what, width);
        fail(b);
    }
    f->kind = kind;
    f->what = what;
    f->mask = mask;
    f->mode = mode;
    f->arg = arg;
    f->width = width;
    f->pred = pred;
    f->value = 0;
    std::memcpy(&f->value, &value, sizeof(T));
    f->state = State::AtWarp;
    yield();
    T out;
    std::memcpy(&out, &f->result, sizeof(T));
    return out;
}

// The PTX shfl.sync rule: the source lane j for `lane`, or -1 when the lane keeps its own value.
inline int shfl_source(int mode, unsigned lane, int b, int width) {
    unsigned segmask = (32u - unsigned(width)) & 31u;  // c[12:8] as CUDA's intrinsics set it
    unsigned cval = mode == ShflUp ? 0u : 31u;
    unsigned bval = unsigned(b) & 31u;
    int max_lane = int((lane & segmask) | (cval & ~segmask));
    int min_lane = int(lane & segmask);
    int j;
    bool ok;
    switch (mode) {
        case ShflUp: j = int(lane) - int(bval); ok = j >= max_lane; break;
        case ShflDown: j = int(lane) + int(bval); ok = j <= max_lane; break;
        case ShflBfly: j = int(lane ^ bval); ok = j <= max_lane; break;
        default: j = min_lane | int(bval & ~segmask); ok = j <= max_lane; break;
    }
    return ok ? j : -1;
}

// Release the lanes of warp `w` whose whole mask has arrived; false when none could go.
inline bool release_warp(size_t w, std::string& err) {
    Launch& L = g_launch;
    size_t base = w * 32, n = std::min<size_t>(32, L.fibers.size() - base);
    bool released = false;
    for (size_t i = 0; i < n; i++) {
        Fiber& f = L.fibers[base + i];
        if (f.state != State::AtWarp) continue;
        unsigned mask = f.mask;
        bool ready = true;
        for (unsigned l = 0; l < 32; l++) {
            if (!((mask >> l) & 1u)) continue;
            if (l >= n) {
                char b[200];
                std::snprintf(b, sizeof b, "%s: mask 0x%08x names lane %u, which does not exist (block of %zu threads)",
                              f.what, mask, l, L.fibers.size());
                err = b;
                return false;
            }
            Fiber& g = L.fibers[base + l];
            if (g.state == State::Done) {
                char b[200];
                std::snprintf(b, sizeof b, "%s: mask 0x%08x names lane %u, which has already exited (warp %zu)",
                              f.what, mask, l, w);
                err = b;
                return false;
            }
            if (g.state != State::AtWarp) { ready = false; continue; }
            if (g.mask != mask || g.kind != f.kind) {
                char b[240];
                std::snprintf(b, sizeof b, "warp %zu: lane %zu is at %s with mask 0x%08x but lane %u is at %s with mask 0x%08x",
                              w, i, f.what, mask, l, g.what, g.mask);
                err = b;
                return false;
            }
        }
        if (!ready) continue;
        unsigned ballot = 0;
        int count = 0;
        for (unsigned l = 0; l < 32; l++)
            if (((mask >> l) & 1u) && L.fibers[base + l].pred) { ballot |= 1u << l; count++; }
        for (unsigned l = 0; l < 32; l++) {
            if (!((mask >> l) & 1u)) continue;
            Fiber& g = L.fibers[base + l];
            switch (g.kind) {
                case WarpKind::Shfl: {
                    int j = shfl_source(g.mode, l, g.arg, g.width);
                    if (j < 0) j = int(l);
                    if (!((mask >> j) & 1u)) {
                        char b[200];
                        std::snprintf(b, sizeof b, "%s: lane %u reads lane %d, which is not in the mask 0x%08x (undefined on a GPU)",
                                      g.what, l, j, mask);
                        err = b;
                        return false;
                    }
                    g.result = L.fibers[base + j].value;
                    break;
                }
                case WarpKind::Ballot: g.result = ballot; break;
                case WarpKind::Any: g.result = ballot != 0; break;
                case WarpKind::All: g.result = ballot == mask; break;
                case WarpKind::Match: {
                    unsigned same = 0;
                    for (unsigned m = 0; m < 32; m++)
                        if (((mask >> m) & 1u) && L.fibers[base + m].value == g.value) same |= 1u << m;
                    g.result = same;
                    break;
                }
                case WarpKind::Sync: g.result = 0; break;
            }
            (void)count;
            g.state = State::Runnable;
        }
        released = true;
    }
    return released;
}

// Release a block barrier when every thread that has not exited is waiting at one.
inline bool release_block() {
    Launch& L = g_launch;
    int waiting = 0, count = 0;
    bool all = true, any = false;
    for (Fiber& f : L.fibers) {
        if (f.state == State::Done) continue;
        if (f.state != State::AtBarrier) return false;
        waiting++;
        count += f.pred != 0;
        all = all && f.pred;
        any = any || f.pred;
    }
    if (!waiting) return false;
    for (Fiber& f : L.fibers) {
        if (f.state != State::AtBarrier) continue;
        f.result = f.bar == BarCount ? (unsigned long long)count : f.bar == BarAnd ? all : f.bar == BarOr ? any : 0;
        f.state = State::Runnable;
    }
    return true;
}

inline std::string describe_deadlock() {
    Launch& L = g_launch;
    int at_bar = 0, done = 0, at_warp = 0;
    std::string warps;
    for (Fiber& f : L.fibers) {
        if (f.state == State::AtBarrier) at_bar++;
        else if (f.state == State::Done) done++;
        else if (f.state == State::AtWarp) {
            if (at_warp++ < 3) {
                char b[160];
                std::snprintf(b, sizeof b, "; thread %u waits at %s with mask 0x%08x", f.linear, f.what, f.mask);
                warps += b;
            }
        }
    }
    char b[200];
    std::snprintf(b, sizeof b, "deadlock in block (%u,%u,%u): %d threads at __syncthreads, %d at warp operations, %d exited",
                  blockIdx.x, blockIdx.y, blockIdx.z, at_bar, at_warp, done);
    return std::string(b) + warps;
}

inline void resume(Fiber* f) {
    Launch& L = g_launch;
    L.current = f;
    threadIdx = f->tid;
    switch_to(&L.scheduler_sp, f->sp);
}

// Runs one block to completion; false on an error (in g_launch.error).
inline bool run_block(int schedule, std::mt19937_64& rng) {
    Launch& L = g_launch;
    size_t n = L.fibers.size();
    for (size_t i = 0; i < n; i++) {
        Fiber& f = L.fibers[i];
        f.state = State::Runnable;
        f.sp = init_stack(stack_for(i), &f);
    }
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; i++) order[i] = schedule == Reverse ? n - 1 - i : i;
    size_t warps = (n + 31) / 32;
    for (;;) {
        if (schedule == Random) std::shuffle(order.begin(), order.end(), rng);
        bool ran = false;
        for (size_t i : order) {
            Fiber& f = L.fibers[i];
            if (f.state != State::Runnable) continue;
            resume(&f);
            ran = true;
            if (L.failed) return false;
        }
        bool released = false, all_done = true;
        for (size_t w = 0; w < warps; w++) {
            std::string err;
            if (release_warp(w, err)) released = true;
            if (!err.empty()) { L.failed = true; L.error = err; return false; }
        }
        for (Fiber& f : L.fibers) all_done = all_done && f.state == State::Done;
        if (all_done) return true;
        if (!released) released = release_block();
        if (!ran && !released) { L.failed = true; L.error = describe_deadlock(); return false; }
    }
}

inline void poison_shared(size_t dynamic_bytes) {
    if (__start_wbemu_shared && __stop_wbemu_shared > __start_wbemu_shared)
        std::memset(__start_wbemu_shared, 0xFF, size_t(__stop_wbemu_shared - __start_wbemu_shared));
    std::memset(g_dynamic_shared, 0xFF, std::min(kMaxDynamicShared, std::max<size_t>(dynamic_bytes, 256)));
}

// ---- kernel thunks: harness.py appends `wbemu_thunk_<name>` and `wbemu_signature_<name>` per kernel.
template <class T, class Enable = void> struct type_code { static std::string get() { return "?" + std::to_string(sizeof(T)); } };
#define WBEMU_CODE(T, S) template <> struct type_code<T> { static std::string get() { return S; } };
WBEMU_CODE(void, "void")
WBEMU_CODE(float, "f32")
WBEMU_CODE(double, "f64")
WBEMU_CODE(bool, "b8")
WBEMU_CODE(char, "i8")
WBEMU_CODE(signed char, "i8")
WBEMU_CODE(unsigned char, "u8")
WBEMU_CODE(short, "i16")
WBEMU_CODE(unsigned short, "u16")
WBEMU_CODE(int, "i32")
WBEMU_CODE(unsigned, "u32")
WBEMU_CODE(long, "i64")
WBEMU_CODE(unsigned long, "u64")
WBEMU_CODE(long long, "i64")
WBEMU_CODE(unsigned long long, "u64")
WBEMU_CODE(float2, "f32x2")
WBEMU_CODE(float4, "f32x4")
WBEMU_CODE(int2, "i32x2")
WBEMU_CODE(int4, "i32x4")
WBEMU_CODE(uint2, "u32x2")
WBEMU_CODE(uint4, "u32x4")
WBEMU_CODE(double2, "f64x2")
template <class T> struct type_code<T*> {
    static std::string get() { return "*" + type_code<std::remove_cv_t<T>>::get(); }
};
// A project type can name itself: WBEMU_TYPE_CODE(bf16, "bf16") after its definition.
#define WBEMU_TYPE_CODE(T, S) namespace emu { WBEMU_CODE(T, S) }

template <class... A, size_t... I>
inline void invoke_impl(void (*k)(A...), void** a, std::index_sequence<I...>) {
    k(*static_cast<std::decay_t<A>*>(a[I])...);
}
template <class... A> inline void invoke(void (*k)(A...), void** a) {
    invoke_impl(k, a, std::index_sequence_for<A...>{});
}
template <class... A> inline const char* signature(void (*)(A...)) {
    static const std::string s = [] {
        std::string out;
        ((out += (out.empty() ? "" : ",") + type_code<std::decay_t<A>>::get()), ...);
        return out;
    }();
    return s.c_str();
}

}  // namespace emu

extern "C" void wbemu_fiber_main(emu::Fiber* f) {
    emu::g_launch.thunk(emu::g_launch.args);
    f->state = emu::State::Done;
    for (;;) emu::yield();  // a finished thread is never resumed
}

// Launch `thunk(args)` on grid x block threads; 0 on success, else see wbemu_last_error().
extern "C" __attribute__((visibility("default"))) int wbemu_launch(void (*thunk)(void**), void** args,
                                                                   const unsigned* grid, const unsigned* block,
                                                                   size_t shared_bytes, size_t max_shared_bytes,
                                                                   int schedule, unsigned long long seed) {
    std::lock_guard<std::mutex> lock(emu::g_mutex);
    emu::Launch& L = emu::g_launch;
    L.thunk = thunk;
    L.args = args;
    L.failed = false;
    L.error.clear();
    size_t static_shared = __start_wbemu_shared ? size_t(__stop_wbemu_shared - __start_wbemu_shared) : 0;
    size_t threads = size_t(block[0]) * block[1] * block[2];
    char b[200];
    if (threads == 0 || threads > 1024 || block[2] > 64) {
        std::snprintf(b, sizeof b, "invalid block (%u,%u,%u): at most 1024 threads and z <= 64", block[0], block[1], block[2]);
        emu::g_last_error = b;
        return 1;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535 || grid[0] > 2147483647u) {
        std::snprintf(b, sizeof b, "invalid grid (%u,%u,%u): y and z at most 65535", grid[0], grid[1], grid[2]);
        emu::g_last_error = b;
        return 1;
    }
    if (shared_bytes + static_shared > max_shared_bytes || shared_bytes > emu::kMaxDynamicShared) {
        std::snprintf(b, sizeof b, "shared memory %zu dynamic + %zu static bytes exceeds the limit of %zu per block",
                      shared_bytes, static_shared, max_shared_bytes);
        emu::g_last_error = b;
        return 1;
    }
    gridDim = dim3(grid[0], grid[1], grid[2]);
    blockDim = dim3(block[0], block[1], block[2]);
    L.fibers.assign(threads, emu::Fiber{});
    for (size_t i = 0; i < threads; i++) {
        emu::Fiber& f = L.fibers[i];
        f.linear = unsigned(i);
        f.tid = uint3{unsigned(i % block[0]), unsigned((i / block[0]) % block[1]), unsigned(i / (size_t(block[0]) * block[1]))};
    }
    std::mt19937_64 rng(seed);
    size_t nblocks = size_t(grid[0]) * grid[1] * grid[2];
    std::vector<size_t> order(nblocks);
    for (size_t i = 0; i < nblocks; i++) order[i] = schedule == emu::Reverse ? nblocks - 1 - i : i;
    if (schedule == emu::Random) std::shuffle(order.begin(), order.end(), rng);
    for (size_t bi : order) {
        blockIdx = uint3{unsigned(bi % grid[0]), unsigned((bi / grid[0]) % grid[1]), unsigned(bi / (size_t(grid[0]) * grid[1]))};
        emu::poison_shared(shared_bytes);
        if (!emu::run_block(schedule, rng)) {
            emu::g_last_error = L.error;
            return 2;
        }
    }
    return 0;
}

extern "C" __attribute__((visibility("default"))) const char* wbemu_last_error() { return emu::g_last_error.c_str(); }

// harness.py compiles with -fsanitize=alignment where g++ supports it: every access through a
// pointer of a wider type (float4, uint4, ...) is checked, and a misaligned one - a fault on the
// GPU ("misaligned address") - stops the launch here with its source line.
struct WbemuSourceLocation { const char* file; unsigned line, column; };
struct WbemuTypeDescriptor { unsigned short kind, info; char name[1]; };
struct WbemuTypeMismatch { WbemuSourceLocation loc; const WbemuTypeDescriptor* type; unsigned char log_alignment, check_kind; };
extern "C" void __ubsan_handle_type_mismatch_v1(void* data, void* pointer) {
    auto* d = static_cast<WbemuTypeMismatch*>(data);
    char b[400];
    std::snprintf(b, sizeof b, "misaligned %u-byte access to %p (type %s) at %s:%u", 1u << d->log_alignment, pointer,
                  d->type ? d->type->name : "?", d->loc.file ? d->loc.file : "?", d->loc.line);
    if (emu::g_launch.current) emu::fail(b);
    std::fprintf(stderr, "%s\n", b);
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(void* data, void* pointer) {
    __ubsan_handle_type_mismatch_v1(data, pointer);
    std::abort();
}

// ---------------------------------------------------------------- the device API on top
inline void __syncthreads() { emu::block_barrier(emu::BarPlain, 0); }
inline int __syncthreads_count(int p) { emu::block_barrier(emu::BarCount, p); return int(emu::g_launch.current->result); }
inline int __syncthreads_and(int p) { emu::block_barrier(emu::BarAnd, p); return int(emu::g_launch.current->result); }
inline int __syncthreads_or(int p) { emu::block_barrier(emu::BarOr, p); return int(emu::g_launch.current->result); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op<int>(emu::WarpKind::Sync, "__syncwarp", mask, 0); }
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::warp_op<T>(emu::WarpKind::Shfl, "__shfl_sync", mask, v, emu::ShflIdx, src, width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::warp_op<T>(emu::WarpKind::Shfl, "__shfl_up_sync", mask, v, emu::ShflUp, int(delta), width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::warp_op<T>(emu::WarpKind::Shfl, "__shfl_down_sync", mask, v, emu::ShflDown, int(delta), width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::warp_op<T>(emu::WarpKind::Shfl, "__shfl_xor_sync", mask, v, emu::ShflBfly, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int p) {
    return emu::warp_op<unsigned>(emu::WarpKind::Ballot, "__ballot_sync", mask, 0u, 0, 0, 32, p != 0);
}
inline int __any_sync(unsigned mask, int p) { return emu::warp_op<int>(emu::WarpKind::Any, "__any_sync", mask, 0, 0, 0, 32, p != 0); }
inline int __all_sync(unsigned mask, int p) { return emu::warp_op<int>(emu::WarpKind::All, "__all_sync", mask, 0, 0, 0, 32, p != 0); }
// The lanes of this warp that have not exited (threads here are never diverged in lockstep).
inline unsigned __activemask() {
    emu::Launch& L = emu::g_launch;
    size_t base = emu::g_launch.current->linear & ~31u;
    unsigned m = 0;
    for (size_t l = 0; l < 32 && base + l < L.fibers.size(); l++)
        if (L.fibers[base + l].state != emu::State::Done) m |= 1u << l;
    return m;
}
[[noreturn]] inline void __trap() { emu::fail("__trap() called"); }
