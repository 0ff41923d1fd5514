"""Everything checked before a run is written or continued, then the run folder's files.

The one way a config reaches an engine is the run's config.toml: `create_run` checks a
config against its data, device and starting checkpoint, resolves the dataset-dependent
fields (config.resolve_data_fields) and writes the run folder; `check_resume` does the
same for an existing run with its changes (--max-steps, --set). The engine, foreground or
detached, then reads config.toml and nothing else. A config is validated where it is read
from TOML (config.load): the user's file once in the command, the run's config.toml once in
the engine. A failed check writes nothing and never touches an existing run.
torch is imported only by the checks that need it (a device, a checkpoint's shapes).
"""

from __future__ import annotations

from pathlib import Path

from workbench.engine import config as config_mod
from workbench.engine.config import RunConfig
from workbench.engine.errors import ConfigError
from workbench.engine.rundir import RunDir, atomic_write_text


def run_exists(path: Path) -> bool:
    """A folder with anything in it is taken: a new run never overwrites."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def open_dataset(cfg: RunConfig):
    """The run's prepared dataset, with cfg's dataset-dependent fields resolved against it."""
    from workbench.engine.data.dataset import Dataset

    dataset = Dataset.open(cfg.data.path)
    dataset.check_seq_len(cfg.model.seq_len)  # a chat dataset's rows must fit the model's context
    config_mod.resolve_data_fields(cfg, dataset.tokenizer.vocab_size, len(dataset.train))
    return dataset


def check_device(cfg: RunConfig) -> None:
    """A CUDA device (or bf16) the machine lacks fails here, before the run is written (torch only then)."""
    if cfg.train.device.startswith("cuda") or cfg.train.dtype == "bfloat16":
        from workbench.engine.device import pick_device, pick_dtype

        pick_dtype(cfg.train.dtype, pick_device(cfg.train.device))


def check_checkpoint_fits(ckpt: Path, cfg: RunConfig, tokenizer_sha256: str) -> None:
    """Tokenizer, file integrity and every shape of `ckpt` against cfg's model, without touching the run."""
    from workbench.engine import checkpoint

    state = checkpoint.read_state(ckpt)
    checkpoint.check_tokenizer(ckpt, state, tokenizer_sha256)
    data = checkpoint.verify_file(ckpt, "model.safetensors", state)

    import torch

    from workbench.engine.model import GPT
    from workbench.kernels import reference_ops

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(cfg.model, reference_ops("shape check"))
    checkpoint.check_shapes(ckpt, state, model, data)


def create_run(run_dir: str | Path, cfg: RunConfig, *, init_from: str | Path | None = None) -> Path:
    """Check cfg (data, device, the checkpoint to start from) and write the new run's folder:
    the tokenizer copy and config.toml with the resolved config. Returns the run folder."""
    run_dir = Path(run_dir)
    if run_exists(run_dir):
        raise ConfigError(f"run {run_dir} already exists; continue it with `workbench train --resume {run_dir}` "
                          "or pick another --run")
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    dataset = open_dataset(cfg)
    if init_from is not None:
        from workbench.engine import checkpoint

        check_checkpoint_fits(checkpoint.resolve(init_from), cfg, dataset.tokenizer.sha256)
    config_mod.validate(cfg)  # resolving may have filled in fields
    check_device(cfg)
    RunDir.at(run_dir).write_run_files(cfg, dataset.tokenizer)
    return run_dir


def check_resume(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Check an existing run can continue (its data, device, latest checkpoint), with `overrides`
    (section.key=value, e.g. a higher train.max_steps) written into its config.toml."""
    from workbench.engine import checkpoint

    run = RunDir.at(run_dir)
    if not run.exists():
        raise ConfigError(f"no run at {run_dir} to resume (no config.toml there)")
    cfg = config_mod.load(run.config, overrides)
    dataset = open_dataset(cfg)
    check_device(cfg)
    latest = run.latest_checkpoint()
    if latest is not None:
        step = int(checkpoint.read_state(latest)["step"])
        if step >= cfg.train.max_steps:
            raise ConfigError(f"run {run_dir} is already at step {step} of {cfg.train.max_steps}; "
                              f"pass --max-steps N (N > {step}) to train further")
        check_checkpoint_fits(latest, cfg, dataset.tokenizer.sha256)
    if overrides:
        atomic_write_text(run.config, config_mod.to_toml(cfg))  # the changes now belong to the run
    return run.root
