"""CPU emulation of CUDA kernels for tests: see harness.py (API) and cuda_emu.h (semantics)."""
