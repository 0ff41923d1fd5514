"""Evaluation: loss, perplexity, bits per byte without special tokens, the worst documents, and `workbench eval`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from engine_helpers import events_of, workbench

from workbench.engine.checkpoint import open_run_model
from workbench.engine.evaluate import evaluate, summarize, token_losses, val_windows, worst_documents

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LN2 = math.log(2)


def test_bits_per_byte_leaves_out_special_tokens():
    # ids: 0 = <|bos|> (0 bytes), 1 = "a" (1 byte), 2 = "bb" (2), 3 = "ccc" (3)
    token_bytes = np.array([0, 1, 2, 3], dtype=np.int32)
    val = np.array([0, 1, 2, 0, 3], dtype=np.uint16)  # two documents: [bos a b] [bos c]
    losses = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)  # targets a, b, bos, c
    result = summarize(losses, val, token_bytes)
    assert result["val_loss"] == pytest.approx(2.5)
    assert result["val_ppl"] == pytest.approx(math.exp(2.5))
    assert result["val_bpb"] == pytest.approx((1 + 2 + 4) / (LN2 * (1 + 2 + 3)))

    docs = np.array([[0, 3, 3], [3, 2, 3]], dtype=np.int64)
    sources = [{"source": "one.txt", "preview": "a b"}, {"source": "two.txt", "preview": "c"}]
    worst = worst_documents(losses, val, token_bytes, docs, sources, 5)
    assert [d["source"] for d in worst] == ["two.txt", "one.txt"]
    assert worst[0]["bpb"] == pytest.approx(4 / (LN2 * 3))  # the <|bos|> target carries no bytes
    assert worst[1]["bpb"] == pytest.approx(3 / (LN2 * 3))
    # Only documents whose every target was evaluated are ranked.
    assert [d["source"] for d in worst_documents(losses[:2], val, token_bytes, docs, sources, 5)] == ["one.txt"]


def test_val_windows():
    assert val_windows(1001, 100, 4, 0) == (10, 100)
    assert val_windows(1001, 100, 4, 2) == (8, 100)
    assert val_windows(50, 100, 4, 0) == (1, 49)  # a val split shorter than the context
    assert val_windows(1, 100, 4, 0) == (0, 0)


def test_token_losses_match_the_model_on_fixed_windows(trained_run, tiny_data):
    loaded = open_run_model(trained_run, need_data=True)
    val = loaded.dataset.val
    losses = token_losses(loaded.model, val, 3, 32, 2, loaded.device)
    assert losses.shape == (6 * 32,)
    window = torch.from_numpy(np.asarray(val[32:65], dtype=np.int64))[None]
    with torch.no_grad():
        direct = loaded.model(window[:, :-1], window[:, 1:])[0].numpy()
    np.testing.assert_allclose(losses[32:64], direct, rtol=1e-5)


def test_periodic_eval_and_standalone_eval_agree(trained_run):
    last = events_of(trained_run, "eval")[-1]
    loaded = open_run_model(trained_run, need_data=True)
    cfg = loaded.cfg
    again = evaluate(loaded.model, loaded.dataset, cfg.train.batch_size, cfg.model.seq_len,
                     cfg.eval.max_batches, loaded.device)
    assert again["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert again["val_bpb"] == pytest.approx(last["val_bpb"], rel=1e-5)


def test_eval_cli_reports_metrics_and_worst_documents(trained_run, tiny_data):
    result = workbench("eval", trained_run, "--worst", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"run {trained_run}, checkpoint step_000020 (step 20)")
    assert lines[1].startswith("val loss ") and "| perplexity " in lines[1] and "| bits per byte " in lines[1]
    assert lines[2] == "worst 3 validation documents by bits per byte:"
    assert len(lines) == 6 and all(" bpb " in line and "corpus.jsonl:" in line for line in lines[3:])

    result = workbench("eval", trained_run, "--checkpoint", "step_000010", "--worst", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["step"] == 10 and data["checkpoint"].endswith("step_000010")
    n_val = len(np.load(tiny_data / "val_docs.npy"))
    assert data["tokens"] == ((data["tokens"] + 1) // 32) * 32 > 30_000  # the whole val split by default
    worst = data["worst_docs"]
    assert len(worst) == 2 and worst[0]["bpb"] >= worst[1]["bpb"] > 0 and all(0 <= d["doc"] < n_val for d in worst)
    # Bits per byte and loss agree through the tokenizer's bytes per token (roughly: specials are left out).
    bytes_per_token = json.loads((tiny_data / "tokenizer.json").read_text())["bytes_per_token"]
    assert data["val_bpb"] == pytest.approx(data["val_loss"] / LN2 / bytes_per_token, rel=0.15)


def test_sample_cli_is_seedable_and_matches_the_library(trained_run):
    from workbench.engine.cli.sample import generate_samples

    result = workbench("sample", trained_run, "--prompt", "The ", "-n", "2", "--temperature", "0.9",
                       "--top-k", "50", "--top-p", "0.95", "--max-tokens", "12", "--seed", "5", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and all(d["prompt"] == "The " and d["checkpoint"] == "step_000020" for d in lines)
    assert [d["seed"] for d in lines] == [5, 6]
    loaded = open_run_model(trained_run)
    again = generate_samples(loaded, "The ", 2, 12, 0.9, 50, 0.95, seed=5)
    assert again == [d["text"] for d in lines]
    assert generate_samples(loaded, "The ", 1, 12, 0.9, 50, 0.95, seed=7) != again[:1]


def test_generated_text_is_made_safe_for_the_terminal():
    from workbench.engine.formatting import terminal_safe

    assert terminal_safe("a\x1b[2Jb\nc\td\x17") == "a\\x1b[2Jb\nc\td\\x17"


def test_a_sample_without_seed_reports_the_seed_that_reproduces_it(trained_run):
    from workbench.engine.cli.sample import generate_samples

    result = workbench("sample", trained_run, "--prompt", "The ", "--max-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    drawn = json.loads(result.stdout)
    assert isinstance(drawn["seed"], int)
    again = generate_samples(open_run_model(trained_run), "The ", 1, 12, drawn["temperature"], drawn["top_k"],
                             drawn["top_p"], seed=drawn["seed"])
    assert again == [drawn["text"]]
