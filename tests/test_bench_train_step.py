"""bench/train_step.py: the full-training-step benchmark runs end to end on the CPU at a tiny shape,
refuses clearly without CUDA, and judges the issue's targets (1.2x, 50% MFU) as it should."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_step import Result, verdicts  # noqa: E402 (bench/ is reached through the root added above)

ROW = re.compile(r"^(\S+)\s+([\d,]+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+(\S+)$")


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


def rows(stdout: str) -> dict[str, tuple]:
    """variant -> (tokens/s, step ms, MFU text, peak text, loss) for each table row."""
    out = {}
    for line in stdout.splitlines():
        m = ROW.match(line)
        if m and m[1] != "variant":
            out[m[1]] = (float(m[2].replace(",", "")), float(m[3]), m[4], m[5], float(m[6]))
    return out


def test_tiny_cpu_run_times_real_training_steps():
    result = bench("--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# ") and "cpu" in lines[0] and "float32" in lines[0]
    assert "2L x 64 x 2H, T=64" in lines[1] and "batch 4 x 64 tokens" in lines[1]
    table = rows(result.stdout)
    assert list(table) == ["torch"]  # the CuPy kernels need CUDA: the reference alone on the CPU
    tokens_per_s, step_ms, mfu, peak, loss = table["torch"]
    assert tokens_per_s > 0 and step_ms > 0
    assert tokens_per_s == pytest.approx(4 * 64 / (step_ms / 1000), rel=0.01)
    assert mfu.endswith("%") and peak == "n/a"
    assert math.isfinite(loss) and 0 < loss < 10  # ~ln(1024) = 6.9 after a few steps from scratch
    assert "targets: not judged" in result.stdout
    assert lines[-1] == "speedup=n/a mfu=n/a verdict=n/a"


def test_given_dataset_and_a_model_vocab_larger_than_the_tokenizer(tiny_data):
    result = bench("--device", "cpu", "--tiny", "--data", tiny_data, "--vocab", "512", "--batch-size", "2",
                   "--steps", "2", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "V=512" in result.stdout and "batch 2 x 64 tokens" in result.stdout
    assert "torch" in rows(result.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so the no-GPU message never shows")
def test_without_cuda_it_says_so_in_one_line():
    result = bench()
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "CUDA" in result.stderr and "--device cpu --tiny" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA present this would start a GPU run")
def test_cupy_on_the_cpu_and_bad_arguments_are_one_line_errors(tmp_path):
    for args in (["--kernels", "cupy"], ["--steps", "0"], ["--data", tmp_path / "nowhere"]):
        result = bench("--device", "cpu", "--tiny", *args)
        assert result.returncode == 1, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


def result(variant: str, tokens_per_s: float, mfu: float | None) -> Result:
    return Result(variant, 1000.0, tokens_per_s, mfu, 10.0, 3.0)


def test_targets_are_judged_on_both_speedup_and_mfu():
    full = Namespace(tiny=False)
    passing = verdicts(full, [result("torch", 100, 0.40), result("cupy", 130, 0.52)], 989e12)
    assert passing[-1] == "speedup=1.30 mfu=52.0% verdict=PASS"
    assert any(line.startswith("speedup cupy / torch: 1.30x") and line.endswith("PASS") for line in passing)
    too_slow = verdicts(full, [result("torch", 100, 0.50), result("cupy", 115, 0.57)], 989e12)
    assert too_slow[-1] == "speedup=1.15 mfu=57.0% verdict=FAIL"
    low_mfu = verdicts(full, [result("torch", 100, 0.30), result("cupy", 125, 0.375)], 989e12)
    assert low_mfu[-1].endswith("verdict=FAIL") and any("MFU" in line and "FAIL" in line for line in low_mfu)
    # With --compile, the compiled pair is judged too, and the best of ours counts for MFU.
    compiled = verdicts(full, [result("torch", 100, 0.4), result("cupy", 125, 0.5),
                               result("torch+compile", 120, 0.48), result("cupy+compile", 130, 0.52)], 989e12)
    assert compiled[-1] == "speedup=1.25 mfu=52.0% verdict=FAIL"  # compiled pair: 130/120 = 1.08x
    # An unknown GPU (no peak, so no MFU) is not judged rather than judged against some other card.
    unknown = verdicts(full, [result("torch", 100, None), result("cupy", 130, None)], None)
    assert unknown[-1] == "speedup=1.30 mfu=n/a verdict=n/a"
