"""Every bad input to train / eval / sample ends in one line `error: ...`, a non-zero exit, and no damage.

All through the real command line in a subprocess.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from engine_helpers import tiny_raw, workbench, write_toml


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.mark.parametrize("content, needles", [
    ("[model\nn_layer = 2\n", ["malformed TOML"]),
    ("[model]\nn_layers = 2\n", ["unknown config key model.n_layers"]),
    ("[model]\nd_model = 30\nn_head = 4\n", ["model.d_model (30) must be divisible by model.n_head (4)"]),
    ("[train]\nbatch_size = \"lots\"\n", ["train.batch_size must be an integer"]),
    ("[optim]\ndecay = \"sometimes\"\n", ["optim.decay must be one of"]),
])
def test_bad_config_files(tiny_data, tmp_path, content, needles):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = workbench("train", config, "--data", tiny_data, "--run", tmp_path / "run")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()


def test_bad_overrides_and_missing_things(tiny_data, tmp_path):
    config = write_toml(tmp_path / "c.toml", tiny_raw())
    run = tmp_path / "run"
    assert_one_line_error(workbench("train", config, "--data", tiny_data, "--run", run, "--set", "lr"),
                          "--set expects section.key=value")
    assert_one_line_error(workbench("train", config, "--data", tmp_path / "nowhere", "--run", run),
                          "no prepared dataset at", "workbench prepare")
    assert_one_line_error(workbench("train", tmp_path / "missing.toml", "--data", tiny_data, "--run", run),
                          "config file not found")
    assert_one_line_error(workbench("train", "--data", tiny_data, "--run", run), "give a CONFIG file")
    assert_one_line_error(workbench("train", config, "--data", tiny_data, "--run", run, "--max-steps", "0"),
                          "--max-steps must be positive")
    assert_one_line_error(workbench("train", config, "--data", tiny_data, "--run", run,
                                    "--set", "model.seq_len=999999"),
                          "not more than model.seq_len 999999")
    assert_one_line_error(workbench("train", "--resume", tmp_path / "no-run"), "no run at")
    assert not run.exists()



def test_a_gpu_the_machine_lacks_is_refused_before_anything_is_written(trained_run, run_copy, tiny_data, tmp_path):
    config = write_toml(tmp_path / "c.toml", tiny_raw())
    result = workbench("train", config, "--data", tiny_data, "--run", tmp_path / "run", "--set", "train.device=cuda:99")
    assert_one_line_error(result, "train.device = 'cuda:99'")
    assert not (tmp_path / "run").exists()
    before = snapshot(run_copy)
    result = workbench("train", "--resume", run_copy, "--max-steps", "30", "--set", "train.device=cuda:99")
    assert_one_line_error(result, "train.device = 'cuda:99'")
    assert snapshot(run_copy) == before  # config.toml keeps its device; no crashed state written

def test_existing_run_is_never_overwritten(trained_run, tiny_data, tmp_path):
    config = write_toml(tmp_path / "c.toml", tiny_raw())
    before = snapshot(trained_run)
    result = workbench("train", config, "--data", tiny_data, "--run", trained_run)
    assert_one_line_error(result, "already exists", f"workbench train --resume {trained_run}")
    assert snapshot(trained_run) == before


def test_checkpoint_shape_mismatch(trained_run, run_copy, tiny_data, tmp_path):
    wide = write_toml(tmp_path / "wide.toml", tiny_raw(model={"d_model": 64}))
    result = workbench("train", wide, "--data", tiny_data, "--run", tmp_path / "new", "--init-from", trained_run)
    assert_one_line_error(result, "does not fit this model", "wte.weight is 400x32 in the checkpoint but 400x64")
    assert not (tmp_path / "new").exists()

    before = snapshot(run_copy)
    result = workbench("train", "--resume", run_copy, "--max-steps", "30", "--set", "model.n_layer=3")
    assert_one_line_error(result, "does not fit this model", "missing blocks.2")
    assert snapshot(run_copy) == before  # config.toml not rewritten, nothing trained


def test_tokenizer_mismatch(trained_run, other_tokenizer_data, tmp_path):
    result = workbench("train", "--init-from", trained_run, "--data", other_tokenizer_data, "--run", tmp_path / "new")
    assert_one_line_error(result, "different tokenizer")
    assert not (tmp_path / "new").exists()


def test_truncated_safetensors(run_copy):
    latest = run_copy / "checkpoints" / "step_000020" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    before = snapshot(run_copy)
    for args in (["sample", run_copy], ["eval", run_copy], ["train", "--resume", run_copy, "--max-steps", "30"]):
        assert_one_line_error(workbench(*args), "step_000020 is corrupt", "model.safetensors")
    assert snapshot(run_copy) == before
    # The older checkpoint is intact and still usable by name.
    assert workbench("sample", run_copy, "--checkpoint", "step_000010", "--max-tokens", "5").returncode == 0


def test_bad_sample_and_eval_arguments(trained_run, tmp_path):
    assert_one_line_error(workbench("sample", trained_run, "-n", "0"), "-n must be at least 1")
    assert_one_line_error(workbench("sample", trained_run, "--top-p", "1.5"), "--top-p must be in (0, 1]")
    assert_one_line_error(workbench("sample", trained_run, "--temperature", "-1"), "--temperature must not be negative")
    assert_one_line_error(workbench("sample", tmp_path / "nothing"), "no run at")
    assert_one_line_error(workbench("sample", trained_run, "--checkpoint", "step_999999"),
                          "has no checkpoint 'step_999999'", "available: step_000010, step_000020")
    assert_one_line_error(workbench("eval", tmp_path / "nothing"), "no run at")
    assert_one_line_error(workbench("eval", trained_run, "--max-batches", "-2"), "must not be negative")
