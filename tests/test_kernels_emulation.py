"""The CUDA emulation harness itself: correct kernels pass, planted bugs are caught.

Each test writes a small .cu file, compiles it with g++ through kernels/emulation/harness.py
and launches it on the CPU. The planted bugs are the classic ones: a shared-memory read
without __syncthreads (a race, caught by comparing thread schedules), a wrong shuffle lane or
mask, a write past a buffer, a divergent __syncthreads (deadlock).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.kernels.emulation import harness
from workbench.kernels.emulation.harness import EmulationError

pytestmark = pytest.mark.skipif(harness.compiler_missing() is not None,
                                reason=harness.compiler_missing() or "")

SOURCE = r"""
#include <cuda_bf16.h>

__device__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// one partial sum per block: shuffles within warps, shared memory across warps
extern "C" __global__ void block_sum(const float* __restrict__ x, float* out, int n) {
    __shared__ float warp_sums[32];
    float v = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) v += x[i];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// planted bug: offsets start at 32, and shfl's lane operand keeps 5 bits, so the first step
// adds each lane's own value (the sum comes out doubled)
extern "C" __global__ void warp_sum_wrong_offset(const float* x, float* out) {
    float v = x[threadIdx.x];
    for (int o = 32; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) out[0] = v;
}

// planted bug: the mask names only the lower half, but lanes read from the upper half
extern "C" __global__ void shuffle_outside_mask(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
    out[threadIdx.x] = v;
}

// planted bug: the mask leaves out the calling lane
extern "C" __global__ void shuffle_mask_without_caller(float* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, 1.0f, 0);
}

// rotate values through shared memory; with_sync = 0 is the planted race
extern "C" __global__ void rotate(const float* x, float* out, int with_sync) {
    __shared__ float s[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = x[i];
    if (with_sync) __syncthreads();
    out[i] = s[(threadIdx.x + 1) % blockDim.x];
}

// the shuffle variants, written out per lane
extern "C" __global__ void shuffles(int* out) {
    const int lane = threadIdx.x;
    out[0 * 32 + lane] = __shfl_up_sync(0xffffffffu, lane, 1);
    out[1 * 32 + lane] = __shfl_down_sync(0xffffffffu, lane, 1, 16);
    out[2 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane, 16, 16);
    out[3 * 32 + lane] = __shfl_sync(0xffffffffu, lane, 3, 8);
    out[4 * 32 + lane] = __shfl_sync(0xffffffffu, lane, 35);
    out[5 * 32 + lane] = (int)__ballot_sync(0xffffffffu, lane & 1);
    out[6 * 32 + lane] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 32);
    out[7 * 32 + lane] = __syncthreads_count(lane % 3 == 0);
}

extern "C" __global__ void write_past_end(float* out, int n) { out[n + threadIdx.x] = 1.0f; }
extern "C" __global__ void read_past_end(const float* x, float* out, int n) { out[0] = x[n]; }

extern "C" __global__ void uninitialised_shared(float* out) {
    __shared__ float s[64];
    out[threadIdx.x] = s[threadIdx.x];
}

// planted bug: half the warp waits at the block barrier, the other half for the whole warp
extern "C" __global__ void divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads(); else __syncwarp();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void dynamic_shared_reverse(const float* x, float* out) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void scale_in_place(const float* x, float* y, float a, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i];
}

extern "C" __global__ void to_bf16(const float* x, __nv_bfloat16* y, float* back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = __float2bfloat16(x[i]);
        back[i] = __bfloat162float(y[i]);
    }
}

extern "C" __global__ void takes_int64(float* out, long long n) { out[0] = (float)n; }
"""


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    path = tmp_path_factory.mktemp("emu") / "planted.cu"
    path.write_text(SOURCE)
    return harness.load(path)


def test_signatures_are_read_from_the_compiled_code(mod):
    assert mod.kernels["block_sum"].signature == ["*f32", "*f32", "i32"]
    assert mod.kernels["to_bf16"].signature == ["*f32", "*bf16", "*f32", "i32"]
    assert mod.kernels["takes_int64"].signature == ["*f32", "i64"]


def test_correct_reduction_passes_under_every_schedule(mod):
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)

    def run(schedule):
        out = np.full(6, np.nan, np.float32)
        mod.launch("block_sum", 6, 128, [x, out, len(x)], schedule=schedule, seed=3)
        return out

    out = harness.run_schedules(run)
    assert np.isclose(out.sum(), x.astype(np.float64).sum(), rtol=1e-5, atol=1e-3)


def test_planted_race_is_caught_and_the_fixed_kernel_passes(mod):
    x = np.arange(512, dtype=np.float32)

    def run(with_sync):
        def launch(schedule):
            out = np.full(512, np.nan, np.float32)
            mod.launch("rotate", 2, 256, [x, out, with_sync], schedule=schedule)
            return out
        return launch

    with pytest.raises(EmulationError, match="race"):
        harness.run_schedules(run(0))
    out = harness.run_schedules(run(1))
    assert np.array_equal(out[:256], np.roll(x[:256], -1))


def test_wrong_shuffle_offset_gives_a_wrong_sum(mod):
    x = np.ones(32, np.float32)
    out = np.zeros(1, np.float32)
    mod.launch("warp_sum_wrong_offset", 1, 32, [x, out])
    assert out[0] == 64.0  # the reference sum is 32: a test against it fails, as it should


def test_shuffle_from_a_lane_outside_the_mask_is_an_error(mod):
    with pytest.raises(EmulationError, match="not in the mask 0x0000ffff"):
        mod.launch("shuffle_outside_mask", 1, 32, [np.zeros(32, np.float32)])
    with pytest.raises(EmulationError, match="does not include the calling lane"):
        mod.launch("shuffle_mask_without_caller", 1, 32, [np.zeros(32, np.float32)])


def test_shuffle_semantics_follow_ptx(mod):
    out = np.zeros(8 * 32, np.int32)
    mod.launch("shuffles", 1, 32, [out])
    lane = np.arange(32)
    rows = out.reshape(8, 32)
    assert list(rows[0]) == [0] + list(range(31))                                  # up 1: lane 0 keeps its own
    assert list(rows[1]) == [i if i % 16 == 15 else i + 1 for i in lane]             # down 1 within 16-lane segments
    # xor 16, width 16: only later segments reach back
    assert list(rows[2]) == [i if i < 16 else i - 16 for i in lane]
    assert list(rows[3]) == [(i & ~7) + 3 for i in lane]                             # idx 3 within 8-lane segments
    assert list(rows[4]) == [3] * 32                                                 # idx 35 wraps to 3
    assert all(int(v) & 0xffffffff == 0xAAAAAAAA for v in rows[5])                      # ballot of odd lanes
    assert list(rows[6]) == [3] * 32                                                 # any(lane==7) + 2*all(true)
    assert list(rows[7]) == [11] * 32                                                # lanes 0,3,...,30


def test_write_past_the_end_is_caught_and_read_past_it_is_nan(mod):
    with pytest.raises(EmulationError, match="past the end of the buffer of argument 0"):
        mod.launch("write_past_end", 1, 4, [np.zeros(8, np.float32), 8])
    out = np.zeros(1, np.float32)
    mod.launch("read_past_end", 1, 1, [np.zeros(8, np.float32), out, 8])
    assert np.isnan(out[0])


def test_shared_memory_starts_poisoned(mod):
    out = np.zeros(64, np.float32)
    mod.launch("uninitialised_shared", 1, 64, [out])
    assert np.isnan(out).all()


def test_divergent_barrier_is_a_deadlock(mod):
    with pytest.raises(EmulationError, match="deadlock"):
        mod.launch("divergent_barrier", 1, 32, [np.zeros(32, np.float32)])


def test_dynamic_shared_memory_and_its_limit(mod):
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(128, np.float32)
    mod.launch("dynamic_shared_reverse", 1, 128, [x, out], shared_bytes=128 * 4, schedule="random")
    assert np.array_equal(out, x[::-1])
    with pytest.raises(EmulationError, match="exceeds the limit"):
        mod.launch("dynamic_shared_reverse", 1, 128, [x, out], shared_bytes=64 * 1024)


def test_overlapping_arguments_share_memory(mod):
    x = torch.arange(100, dtype=torch.float32)
    mod.launch("scale_in_place", 4, 32, [x, x, 2.0, 100])  # y is x: in place
    assert torch.equal(x, 2 * torch.arange(100, dtype=torch.float32))
    base = torch.arange(20, dtype=torch.float32)
    mod.launch("scale_in_place", 1, 32, [base[:10], base[10:], -1.0, 10])  # adjacent views of one buffer
    assert torch.equal(base[10:], -torch.arange(10, dtype=torch.float32))


def test_bf16_conversion_rounds_to_nearest_even_like_torch(mod):
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.standard_normal(3000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 3000),
        # exact ties between two bf16 values, both parities, and the specials
        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 65504.0, 3.4e38, 1e-40,
                  np.inf, -np.inf, 0.0, -0.0], np.float32),
    ]).astype(np.float32)
    x = torch.from_numpy(values)
    y = torch.empty(len(values), dtype=torch.bfloat16)
    back = torch.empty(len(values))
    mod.launch("to_bf16", (len(values) + 127) // 128, 128, [x, y, back, len(values)])
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(back, x.bfloat16().float())


def test_bad_arguments_are_clear_errors(mod):
    out = np.zeros(4, np.float32)
    with pytest.raises(EmulationError, match="takes 3 arguments"):
        mod.launch("block_sum", 1, 32, [out, out])
    with pytest.raises(EmulationError, match="must point to f32, got a i32 buffer"):
        mod.launch("block_sum", 1, 32, [np.zeros(4, np.int32), out, 4])
    with pytest.raises(EmulationError, match="must be an integer"):
        mod.launch("block_sum", 1, 32, [out, out, 4.0])
    with pytest.raises(EmulationError, match="no kernel 'nope'"):
        mod.launch("nope", 1, 32, [])
    with pytest.raises(EmulationError, match="invalid block"):
        mod.launch("block_sum", 1, 2048, [out, out, 4])


def test_backend_rejects_python_ints_for_64_bit_parameters(tmp_path, monkeypatch):
    # CuPy passes a Python int as int32: the emulation backend refuses what the GPU would misread
    kernels_dir = tmp_path
    (kernels_dir / "k.cu").write_text(SOURCE)
    monkeypatch.setattr(harness, "KERNELS_DIR", kernels_dir)
    backend = harness.EmulationBackend()
    out = torch.zeros(1)
    with pytest.raises(EmulationError, match="Python int, which CuPy passes as int32"):
        backend.launch("k.cu", "takes_int64", 1, 1, [out, 5])
    backend.launch("k.cu", "takes_int64", 1, 1, [out, np.int64(5)])
    assert out.item() == 5.0


def test_compile_errors_are_reported(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    with pytest.raises(EmulationError, match="undefined_name"):
        harness.load(bad)


@pytest.mark.skipif(harness.compiler_missing() is None and not harness._sanitize_flags(harness.compiler()),
                    reason="this g++ cannot link -fsanitize=alignment, so misaligned accesses go unchecked")
def test_misaligned_vector_access_is_caught(tmp_path):
    path = tmp_path / "vec.cu"
    path.write_text('extern "C" __global__ void copy4(const float* x, float* y) {\n'
                    '    reinterpret_cast<float4*>(y)[threadIdx.x] = reinterpret_cast<const float4*>(x)[threadIdx.x];\n'
                    '}\n')
    mod = harness.load(path)
    x, y = torch.arange(17, dtype=torch.float32), torch.zeros(16)
    mod.launch("copy4", 1, 4, [x[:16], y])
    assert torch.equal(x[:16], y)
    with pytest.raises(EmulationError, match=r"misaligned 16-byte access .* at .*vec.cu:2"):
        mod.launch("copy4", 1, 4, [x[1:], y])  # 4 bytes off: a fault on the GPU too


def test_portable_ucontext_fibers_give_the_same_results(tmp_path_factory):
    # the fallback for machines other than x86-64 (swapcontext instead of the assembly switch)
    path = tmp_path_factory.mktemp("emu_ucontext") / "planted.cu"
    path.write_text(SOURCE)
    mod = harness.load(path, defines={"WBEMU_USE_UCONTEXT": 1})
    x = np.random.default_rng(2).standard_normal(3000).astype(np.float32)

    def run(schedule):
        out = np.zeros(4, np.float32)
        mod.launch("block_sum", 4, 96, [x, out, len(x)], schedule=schedule)
        return out

    assert np.isclose(harness.run_schedules(run).sum(), x.astype(np.float64).sum(), rtol=1e-5, atol=1e-3)
    with pytest.raises(EmulationError, match="deadlock"):
        mod.launch("divergent_barrier", 1, 32, [np.zeros(32, np.float32)])
