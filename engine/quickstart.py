"""The quick start's recipe, shared by `workbench quickstart` (engine/cli/quickstart.py) and the TUI.

Prepares the built-in corpus (Python's own documentation: no download) unless it is
already prepared, trains the `tiny` preset for a few hundred steps (CUDA if present,
else the CPU: a few minutes on two cores), then prints a sample. An existing run is
never overwritten: the next free name (runs/quickstart-2, ...) is used instead.

With --chat it goes on: the built-in chat data (conversations made offline from Python's own
documentation) prepared with the base run's tokenizer and seq_len, then chat fine-tuning of the base
run with SFT_RECIPE (examples/sft-cpu.toml holds the same values), then a first reply.
"""

from __future__ import annotations

from pathlib import Path

from workbench.engine.errors import ConfigError
from workbench.engine.formatting import nbytes

DEFAULT_STEPS = 300
SAMPLE_PROMPT = "The "

# Chat fine-tuning of the tiny preset on the built-in chat data, on a CPU (examples/sft-cpu.toml is this
# recipe as a file; a test keeps the two the same): the base run's peak lr (2e-3 measured best of 1e-3, 2e-3
# and 3e-3 on held-out assistant-token loss, 300 steps) with a short warmup, no weight decay,
# the base model's shape and seq_len, whole rows of 128 positions, a reply every sample_interval steps.
SFT_STEPS = 300
SFT_RECIPE = {
    "optim": {"lr": 2e-3, "warmup_steps": 20, "min_lr_ratio": 0.1, "weight_decay": 0.0},
    "train": {"batch_size": 16, "max_steps": SFT_STEPS, "log_interval": 10},
    "eval": {"interval": 100, "max_batches": 10, "sample_interval": 100, "sample_prompt": "", "sample_tokens": 96},
    "checkpoint": {"interval": 100},
}
CHAT_PROMPT = "What does os.path.join do?"  # the first reply quickstart --chat prints


def free_run_dir(path: Path) -> Path:
    from workbench.engine.run_setup import run_exists

    if not run_exists(path):
        return path
    n = 2
    while run_exists(path.with_name(f"{path.name}-{n}")):
        n += 1
    return path.with_name(f"{path.name}-{n}")


def ensure_builtin_data(data: Path) -> None:
    from workbench.engine.data.prepare import prepare

    if data.is_dir() and (data / "train.bin").is_file():
        print(f"using the prepared corpus in {data}")
        return
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise ConfigError(f"{data} exists but is not a prepared dataset; pass another --data")
    print(f"preparing the built-in corpus (Python's documentation) into {data} ...", flush=True)
    report = prepare(None, data)
    kept = report["kept"]
    print(f"  {kept['documents']:,} documents, {nbytes(kept['bytes'])}, {kept['tokens']:,} tokens "
          f"in {report['seconds']:.0f} s", flush=True)


def quickstart_config(steps: int, data: Path | None = None):
    """The tiny preset as the quick start trains it (the CLI and the TUI's quick start share it)."""
    from workbench.engine import config as config_mod

    interval = max(1, steps // 3)
    cfg = config_mod.load(preset="tiny", overrides=[
        f"train.max_steps={steps}", f"train.log_interval={max(1, steps // 30)}",
        f"eval.interval={interval}", f"checkpoint.interval={interval}",
        f"eval.sample_interval={interval}", f"eval.sample_prompt={SAMPLE_PROMPT!r}",
    ])
    if data is not None:
        cfg.data.path = str(data)
    return cfg


def sft_config(steps: int = SFT_STEPS, data: Path | None = None, device: str | None = None):
    """The tiny preset with SFT_RECIPE (and `steps`), for chat fine-tuning a quick-start base run."""
    from workbench.engine import config as config_mod

    overrides = [f"{section}.{key}={value!r}" if isinstance(value, str) else f"{section}.{key}={value}"
                 for section, values in SFT_RECIPE.items() for key, value in values.items()]
    overrides += [f"train.max_steps={steps}", f"eval.interval={max(1, min(100, steps // 3))}",
                  f"eval.sample_interval={max(1, min(100, steps // 3))}", f"checkpoint.interval={max(1, steps // 3)}"]
    if device is not None:
        overrides.append(f"train.device={device!r}")
    cfg = config_mod.load(preset="tiny", overrides=overrides)
    if data is not None:
        cfg.data.path = str(data)
    return cfg


def ensure_builtin_chat_data(data: Path, base_run: Path) -> None:
    """The built-in chat data in `data`, with the base run's tokenizer (and seq_len); an existing chat
    dataset there is reused only when its tokenizer is the base run's."""
    from workbench.engine.data.dataset import Dataset
    from workbench.engine.data.prepare import prepare
    from workbench.engine.data.tokenizer import Tokenizer

    if data.is_dir() and (data / "chat.json").is_file():
        if Dataset.open(data).tokenizer.sha256 == Tokenizer.load(base_run / "tokenizer.model").sha256:
            print(f"using the prepared chat data in {data}")
            return
        raise ConfigError(f"{data} holds chat data with another tokenizer than {base_run}'s; pass another --chat-data")
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise ConfigError(f"{data} exists but is not a prepared chat dataset; pass another --chat-data")
    print(f"preparing the built-in chat data (conversations from Python's documentation) into {data} ...", flush=True)
    report = prepare(None, data, {"builtin_chat": True, "tokenizer_from": str(base_run)})
    chat = report["chat"]
    print(f"  {report['kept']['documents']:,} conversations, {chat['rows']['train']:,} train rows of "
          f"{chat['seq_len']} tokens in {report['seconds']:.0f} s", flush=True)


def first_reply(run_dir: Path, prompt: str = CHAT_PROMPT, max_tokens: int = 120) -> str:
    """A greedy reply of the run's latest checkpoint to one user message (up to its <|end|>)."""
    from workbench.engine.chat import ChatTemplate
    from workbench.engine.checkpoint import open_run_model

    loaded = open_run_model(run_dir)
    template = ChatTemplate(loaded.tokenizer)
    seq_len = loaded.cfg.model.seq_len
    # The prompt may take all but one position of the context; the reply gets what is left, up to max_tokens.
    ids = template.render_prompt([{"role": "user", "content": prompt}], seq_len - 1).ids
    loaded.model.eval()
    out = loaded.model.generate(ids, min(max_tokens, seq_len - len(ids)), temperature=0.0,
                                stop_ids=[template.end_id])
    return template.reply_text(out)
