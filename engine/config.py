"""Run configuration: TOML files, built-in presets, `--set key=value` overrides, validation.

A config is layered: preset (optional `preset = "name"` at the top of the file)
-> the TOML file -> `--set section.key=value` overrides. Every layer is checked
against the dataclasses below, so an unknown key or a wrong type is an error
that names the key, never a silently ignored setting.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from workbench.engine.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    path: str = ""  # a prepared dataset folder (train.bin, val.bin, tokenizer.model...)


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 = same as n_head (no grouped-query attention)
    d_model: int = 128
    d_ff: int = 0  # 0 = SwiGLU default: 8/3 * d_model rounded up to a multiple of 32
    seq_len: int = 128
    vocab_size: int = 0  # 0 = take it from the dataset's tokenizer
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    # Wall-time budget in seconds (0 = none). The run ends at max_steps or max_seconds, whichever
    # comes first, and the lr schedule decays over that same horizon. Timing-dependent, so a run
    # that uses it is not bit-reproducible; step-bounded runs are.
    max_seconds: float = 0.0
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    kernels: str = "auto"  # auto | cupy | torch
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    log_interval: int = 1


@dataclass
class EvalConfig:
    interval: int = 200  # steps between validation passes; 0 = only at the end
    max_batches: int = 20  # batches per periodic validation pass; 0 = the whole split
    sample_interval: int = 0  # steps between samples; 0 = off
    sample_prompt: str = ""
    sample_tokens: int = 64
    worst_docs: int = 5


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps between checkpoints; a final one is always written
    keep_last: int = 3
    keep_best: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


CHOICES = {
    ("optim", "decay"): ("cosine", "linear", "constant"),
    ("train", "dtype"): ("auto", "float32", "bfloat16"),
    ("train", "kernels"): ("auto", "cupy", "torch"),
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a TOML file: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed TOML in {path}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {path}") from None


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of --set as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        out.setdefault(parts[0], {})[parts[1]] = _parse_value(value.strip())
    return out


def _coerce(section: str, name: str, expected: type, value: Any) -> Any:
    where = f"{section}.{name}"
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(expected)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from plain data; unknown sections or keys are errors."""
    cfg = RunConfig()
    sections = {f.name: f for f in fields(RunConfig)}
    for section, values in raw.items():
        if section == "preset":
            continue
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}] (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        target = getattr(cfg, section)
        known = {f.name: f for f in fields(target)}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown config key {section}.{name} (known: {', '.join(known)})")
            expected = _TYPES[known[name].type] if isinstance(known[name].type, str) else known[name].type
            setattr(target, name, _coerce(section, name, expected, value))
    validate(cfg)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         preset: str | None = None) -> RunConfig:
    """Load a config: preset, then the file, then --set overrides; validated."""
    raw: dict[str, Any] = {}
    file_raw = _read_toml(Path(path)) if path else {}
    preset = preset or file_raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(preset_names())})")
        raw = _read_toml(PRESETS_DIR / f"{preset}.toml")
    raw = _merge(raw, file_raw)
    raw = _merge(raw, parse_overrides(overrides or []))
    return from_dict(raw)


def _positive(cfg: RunConfig, *names: str) -> None:
    for dotted in names:
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{dotted} must be positive, got {getattr(getattr(cfg, section), key)}")


def validate(cfg: RunConfig) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(allowed)}, got {value!r}")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    _positive(cfg, "model.n_layer", "model.n_head", "model.d_model", "model.seq_len",
              "train.batch_size", "train.grad_accum", "train.max_steps", "optim.lr",
              "model.rope_theta", "model.norm_eps")
    m = cfg.model
    for dotted in ("model.n_kv_head", "model.d_ff", "model.vocab_size", "optim.warmup_steps",
                   "optim.weight_decay", "optim.grad_clip", "eval.interval", "eval.max_batches",
                   "eval.sample_interval", "eval.sample_tokens", "eval.worst_docs",
                   "checkpoint.interval", "train.threads", "optim.min_lr_ratio", "train.max_seconds"):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"{dotted} must not be negative")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    if (m.d_model // m.n_head) % 2:
        raise ConfigError(f"head size d_model/n_head = {m.d_model // m.n_head} must be even for RoPE")
    kv = m.n_kv_head or m.n_head
    if kv > m.n_head or m.n_head % kv:
        raise ConfigError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({kv})")
    if m.vocab_size and m.vocab_size < 16:
        raise ConfigError(f"model.vocab_size must be at least 16, got {m.vocab_size}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio must be between 0 and 1")
    if not (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1):
        raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be at least 1")


def resolve_data_fields(cfg: RunConfig, vocab_size: int, train_tokens: int) -> None:
    """The fields that depend on the dataset, the one place they are settled: model.vocab_size 0
    takes the tokenizer's; a smaller one, or a seq_len the train split cannot fill, is an error."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                          "set it to 0 to take the tokenizer's")
    if train_tokens <= cfg.model.seq_len:
        raise ConfigError(f"the train split of {cfg.data.path} has {train_tokens} tokens, not more than "
                          f"model.seq_len {cfg.model.seq_len}; use a shorter seq_len or more data")


def to_toml(cfg: RunConfig) -> str:
    """Serialise a config as TOML (the run directory's config.toml)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return "\n".join(lines)
