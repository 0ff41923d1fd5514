"""Chat fine-tuning is training: whole-row batches, loss and val metrics on assistant tokens only, exact
resume, --init-from a base run, seq_len checked before a run is written, periodic replies, the recipe."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_helpers import events_of, step_losses, tiny_config, workbench
from test_resume import assert_identical, final_tensors, resumed_losses

from workbench.engine import config as config_mod
from workbench.engine.control import StopAt
from workbench.engine.data.dataset import Dataset
from workbench.engine.data.prepare import prepare
from workbench.engine.errors import DataError
from workbench.engine.evaluate import LN2, evaluate
from workbench.engine.quickstart import SFT_RECIPE, sft_config
from workbench.engine.run_setup import create_run
from workbench.engine.rundir import RunDir
from workbench.engine.train import CHAT_PROMPTS, IGNORE, Trainer, get_rows, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent
SEQ = 32  # the tiny test model's seq_len (engine_helpers.TINY)
WORDS = "alpha beta gamma delta river stone cloud light green paper".split()


def write_chats(path: Path, n: int = 240, seed: int = 0) -> Path:
    import json

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            messages = [{"role": "user", "content": f"What is {a} {i}?"},
                        {"role": "assistant", "content": f"{a} {i} is {b}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def prepare_chat(out: Path, tokenizer_from: Path) -> Path:
    source = write_chats(out.parent / f"{out.name}.jsonl")
    prepare([source], out, {"tokenizer_from": str(tokenizer_from), "seq_len": SEQ, "val_fraction": 0.2})
    return out


@pytest.fixture(scope="module")
def chat_data(tiny_data, tmp_path_factory) -> Path:
    """Short conversations packed into rows of 33 tokens, with tiny_data's tokenizer (that of trained_run)."""
    return prepare_chat(tmp_path_factory.mktemp("chat_train") / "chat", tiny_data)


CHAT = {"train": {"max_steps": 12, "threads": 1}, "eval": {"interval": 6, "max_batches": 2},
        "checkpoint": {"interval": 6}}


def chat_config(data: Path, **sections):
    merged = {k: dict(v) for k, v in CHAT.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return tiny_config(data, **merged)


def set_up(run: Path, cfg, init_from=None) -> Trainer:
    trainer = Trainer(create_run(run, cfg, init_from=init_from), init_from=init_from, echo=None)
    trainer.setup()
    return trainer


def masked_mean_loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """sum(CE * w) / sum(w) from the full logits, w = (y != IGNORE): the dataset docstring's formula."""
    with torch.no_grad():
        logits = model(x)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.clamp(min=0).reshape(-1), reduction="none")
    w = (y != IGNORE).reshape(-1).float()
    return float((ce * w).sum() / w.sum())


def test_row_batches_are_whole_rows_and_a_pure_function_of_seed_step_micro(chat_data):
    ds = Dataset.open(chat_data)
    tokens, mask = ds.rows("train")
    x, y = get_rows(tokens, mask, 7, 3, 1, 8)
    x2, y2 = get_rows(tokens, mask, 7, 3, 1, 8)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.shape == y.shape == (8, SEQ) and x.dtype == np.int64
    assert (x[:, 0] == ds.tokenizer.bos_id).all()  # each one a row's start
    assert not np.array_equal(get_rows(tokens, mask, 7, 4, 1, 8)[0], x)
    assert not np.array_equal(get_rows(tokens, mask, 7, 3, 0, 8)[0], x)
    # Whole rows: the targets are the row shifted by one, IGNORE exactly where the mask is 0.
    picked = np.random.default_rng([7, 3, 1]).integers(0, len(tokens), size=8)
    assert np.array_equal(x, np.asarray(tokens[picked, :-1]))
    trained = np.asarray(mask[picked, 1:]) > 0
    assert trained.any(axis=1).all()
    assert np.array_equal(y, np.where(trained, np.asarray(tokens[picked, 1:], dtype=np.int64), IGNORE))


def test_loss_is_the_mean_over_assistant_tokens_only(chat_data, tmp_path):
    # Two micro-batches: the step's loss is the mean over all its trained targets, whichever micro holds them.
    trainer = set_up(tmp_path / "run", chat_config(chat_data, train={"grad_accum": 2}))
    batches = [trainer._batch(0, m) for m in range(2)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    want = masked_mean_loss(trainer.model, x, y)
    loss, _, _, applied = trainer.train_step()
    assert applied and loss == pytest.approx(want, rel=1e-5)
    assert trainer.tokens == 2 * 4 * SEQ  # positions run over (padding included), as tokens/s counts them

    # An untrained target (the end of a row: padding, mask 0) changes nothing; an assistant token does.
    tokens, mask = (np.array(a) for a in trainer.dataset.rows("train"))
    r = int(np.flatnonzero(mask[:, -1] == 0)[0])
    vocab = trainer.dataset.tokenizer.vocab_size

    def loss_of(row: np.ndarray) -> float:
        xb, yb = get_rows(row[None], mask[r][None], 0, 0, 0, 1)
        with torch.no_grad():
            return float(trainer.model(torch.from_numpy(xb), torch.from_numpy(yb)).sum() / (yb != IGNORE).sum())

    row = tokens[r]
    padding = row.copy()
    padding[-1] = (row[-1] + 1) % vocab
    last_trained = int(np.flatnonzero(mask[r] == 1)[-1])
    answer = row.copy()
    answer[last_trained] = (row[last_trained] + 1) % vocab
    assert loss_of(padding) == loss_of(row)
    assert loss_of(answer) != loss_of(row)
    # Per target, the model's loss is 0 wherever the target is ignored.
    xb, yb = (torch.from_numpy(a) for a in get_rows(row[None], mask[r][None], 0, 0, 0, 1))
    with torch.no_grad():
        assert (trainer.model(xb, yb)[yb == IGNORE] == 0).all()


def test_chat_fine_tuning_resume_is_bit_identical(chat_data, trained_run, tmp_path):
    sections = {"train": {"max_steps": 12, "threads": 1}, "eval": {"sample_interval": 5, "sample_tokens": 8}}
    straight = tmp_path / "straight"
    cfg = chat_config(chat_data, **sections)
    assert train(create_run(straight, cfg, init_from=trained_run), init_from=trained_run, echo=None) == "finished"
    split = tmp_path / "split"
    cfg = chat_config(chat_data, **sections)
    assert train(create_run(split, cfg, init_from=trained_run), init_from=trained_run, control=StopAt(5),
                 echo=None) == "stopped"
    assert train(split, resume=True, echo=None) == "finished"
    want, got = step_losses(straight), resumed_losses(split)
    assert sorted(got) == list(range(6, 13)) and got == {s: want[s] for s in got}
    for a, b in zip(final_tensors(straight), final_tensors(split), strict=True):
        assert_identical(a, b)
    assert ({e["step"]: e["text"] for e in events_of(split, "sample")}
            == {e["step"]: e["text"] for e in events_of(straight, "sample")})
    # Fine-tuning started from the base weights (its first loss is far below a fresh model's ln(vocab)).
    assert want[1] < math.log(400)


def test_init_from_a_base_run_with_another_tokenizer_is_refused_in_one_line(trained_run, other_tokenizer_data,
                                                                             tmp_path):
    other_chat = prepare_chat(tmp_path / "other_chat", other_tokenizer_data)
    run = tmp_path / "chat"
    result = workbench("train", REPO / "examples" / "sft-cpu.toml", "--init-from", trained_run, "--data", other_chat,
                       "--run", run, "--set", "model.seq_len=32", "--set", "model.n_layer=2",
                       "--set", "model.n_head=2", "--set", "model.d_model=32")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "different tokenizer" in lines[0], result.stderr
    assert not run.exists()


def test_a_model_context_shorter_than_the_rows_is_refused_before_anything_is_written(chat_data, tmp_path):
    run = tmp_path / "short"
    with pytest.raises(DataError, match=r"packed for seq_len 32 but model.seq_len is 16"):
        create_run(run, chat_config(chat_data, model={"seq_len": 16}))
    assert not run.exists()
    create_run(tmp_path / "longer", chat_config(chat_data, model={"seq_len": 64}))  # a longer context is fine


def test_val_metrics_are_on_assistant_tokens_only(chat_data, tmp_path):
    trainer = set_up(tmp_path / "run", chat_config(chat_data))
    ds = trainer.dataset
    result = evaluate(trainer.model, ds, 4, SEQ, 0, trainer.device, worst=3)
    tokens, mask = ds.rows("val")
    x = torch.from_numpy(np.asarray(tokens[:, :-1], dtype=np.int64))
    y = np.where(np.asarray(mask[:, 1:]) > 0, np.asarray(tokens[:, 1:], dtype=np.int64), IGNORE)
    with torch.no_grad():
        logits = trainer.model(x)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).clamp(min=0).reshape(-1),
                         reduction="none").numpy().astype(np.float64)
    w = (y.reshape(-1) != IGNORE)
    assert result["tokens"] == int(np.asarray(mask[:, 1:]).sum()) == int(w.sum())
    assert result["val_loss"] == pytest.approx(ce[w].mean(), rel=1e-4)
    nbytes = ds.token_bytes[np.where(w, y.reshape(-1), 0)] * w
    assert result["val_bpb"] == pytest.approx(ce[nbytes > 0].sum() / (LN2 * nbytes.sum()), rel=1e-4)
    assert result["scope"] == "assistant tokens"
    worst = result["worst_docs"]
    assert len(worst) == 3 and worst[0]["bpb"] >= worst[1]["bpb"] >= worst[2]["bpb"] > 0
    # Periodic passes are the same numbers, over the first max_batches * batch_size rows.
    part = evaluate(trainer.model, ds, 4, SEQ, 2, trainer.device)
    assert part["tokens"] == int(np.asarray(mask[:8, 1:]).sum())
    assert trainer.run_eval()["val_loss"] == pytest.approx(part["val_loss"], rel=1e-6)


def test_a_chat_run_samples_replies_to_the_fixed_prompts(chat_data, tmp_path):
    run = tmp_path / "run"
    # A context of 64 (longer than the rows: allowed) so each built-in prompt fits this tiny vocabulary's tokens.
    cfg = chat_config(chat_data, model={"seq_len": 64}, train={"max_steps": 9},
                      eval={"sample_interval": 3, "sample_tokens": 12})
    assert train(create_run(run, cfg), echo=None) == "finished"
    samples = events_of(run, "sample")
    assert [e["step"] for e in samples] == [3, 6, 9]
    assert [e["prompt"] for e in samples] == list(CHAT_PROMPTS[:3])  # the user text, one prompt each in turn
    for e in samples:
        assert isinstance(e["text"], str) and "<|" not in e["text"]
    log = " ".join(e["message"] for e in events_of(run, "log"))
    assert "loss on assistant tokens only" in log
    # A non-empty eval.sample_prompt is the one user turn; the reply stops at <|end|> (never past it).
    trainer = Trainer(run, resume=True, echo=None)
    trainer.setup()
    assert trainer.sample("What is alpha 3?", 12, seed=1) == trainer.sample("What is alpha 3?", 12, seed=1)
    assert events_of(run, "sample")[-1]["prompt"] == "What is alpha 3?"
    assert RunDir.at(run).latest_checkpoint().name == "step_000009"


def test_a_chat_prompt_longer_than_the_context_skips_the_sample_not_the_run(chat_data, tmp_path):
    run = tmp_path / "run"
    cfg = chat_config(chat_data, train={"max_steps": 4}, eval={"sample_interval": 2, "sample_prompt": "word " * 40})
    assert train(create_run(run, cfg), echo=None) == "finished"
    assert not events_of(run, "sample")
    assert sum("periodic sample skipped" in e["message"] for e in events_of(run, "log")) == 2


def test_sft_cpu_toml_is_the_quickstart_recipe():
    from_file = config_mod.load(REPO / "examples" / "sft-cpu.toml")
    recipe = sft_config(device="cpu")  # the quick start's own runs pick the device (auto)
    assert from_file.to_dict() | {"data": None} == recipe.to_dict() | {"data": None}
    for section, values in SFT_RECIPE.items():
        for key, value in values.items():
            assert getattr(getattr(from_file, section), key) == value, f"{section}.{key}"
    assert from_file.model.seq_len == config_mod.load(preset="tiny").model.seq_len  # the base model's context


@pytest.mark.slow
def test_quickstart_chat_end_to_end(tmp_path):
    # About a minute on two idle cores (the same pipeline as the full quick start, with fewer steps).
    result = workbench("quickstart", "--chat", "--steps", "20", "--chat-steps", "10", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "chat fine-tuning" in out and "the chat model's first reply" in out and "assistant:" in out
    chat_run = tmp_path / "runs" / "quickstart-chat"
    assert RunDir.at(chat_run).latest_checkpoint().name == "step_000010"
    assert Dataset.open(tmp_path / "data" / "builtin-chat").chat is not None
    evals = events_of(chat_run, "eval")
    assert evals and all(e["val_loss"] is not None for e in evals)
