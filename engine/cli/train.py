"""`workbench train`: start a run, resume one, or fine-tune from a checkpoint.

    workbench train CONFIG --data D --run R [--max-steps N] [--set section.key=value]...
    workbench train --resume R [--max-steps N]
    workbench train [CONFIG] --init-from RUN_OR_CHECKPOINT --data D --run R
    ... --detach                      (the detached engine: workbench.engine.process.host.spawn_detached)

Everything that can fail because of the user's input (config, data, checkpoint shapes,
tokenizer) is checked before anything is written, so a failed start leaves no half run
and never touches an existing one. torch is imported only once the checks pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.engine import config as config_mod
from workbench.engine.errors import ConfigError

DEFAULT_DATA = "data/builtin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (e.g. examples/tiny-cpu.toml); not with --resume")
    parser.add_argument("--data", metavar="DIR", help=f"prepared dataset folder (default: data.path, else {DEFAULT_DATA})")
    parser.add_argument("--run", metavar="DIR", help="run folder to create (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, metavar="N", help="train to step N (also extends a resumed run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", metavar="RUN", help="continue RUN exactly from its latest checkpoint")
    parser.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                        help="new run starting from these weights (fresh optimizer and step; same tokenizer)")
    parser.add_argument("--detach", action="store_true", help="train in a background engine process and return")


def _overrides(args) -> list[str]:
    items = list(args.set)
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive, got {args.max_steps}")
        items.append(f"train.max_steps={args.max_steps}")
    return items


def _open_dataset(cfg) -> object:
    from workbench.engine.data.dataset import Dataset

    dataset = Dataset.open(cfg.data.path)
    vocab = dataset.tokenizer.vocab_size
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {vocab}; "
                          "set it to 0 to take the tokenizer's")
    if len(dataset.train) <= cfg.model.seq_len:
        raise ConfigError(f"the train split of {cfg.data.path} has {len(dataset.train)} tokens, not more than "
                          f"model.seq_len {cfg.model.seq_len}; use a shorter seq_len or more data")
    return dataset


def _check_device(cfg) -> None:
    """A CUDA device (or bf16) the machine lacks fails here, before the run is written (torch only then)."""
    if cfg.train.device.startswith("cuda") or cfg.train.dtype == "bfloat16":
        from workbench.engine.device import pick_device, pick_dtype

        pick_dtype(cfg.train.dtype, pick_device(cfg.train.device))


def _check_checkpoint_fits(ckpt: Path, cfg, tokenizer_sha256: str) -> None:
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


def _new_run_config(args):
    if args.config:
        return config_mod.load(args.config, _overrides(args))
    if args.init_from:
        # No config: fine-tune with the source run's settings (the model shape must match anyway).
        from workbench.engine import checkpoint

        source = checkpoint.read_state(checkpoint.resolve(args.init_from)).get("config")
        if not isinstance(source, dict):
            raise ConfigError(f"{args.init_from} records no config; pass a CONFIG file")
        source = {k: v for k, v in source.items() if k != "data"}
        source["model"] = {**source.get("model", {}), "vocab_size": 0}
        base = config_mod.from_dict(source)
        return config_mod.from_dict(_merge_overrides(base, _overrides(args)))
    raise ConfigError("give a CONFIG file (e.g. examples/tiny-cpu.toml), or --resume RUN, or --init-from RUN")


def _merge_overrides(cfg, overrides: list[str]) -> dict:
    raw = cfg.to_dict()
    for section, values in config_mod.parse_overrides(overrides).items():
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"unknown config section [{section}]")
        raw[section].update(values)
    return raw


def run_exists(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def prepare_new_run(args):
    """Config, data and (with --init-from) the source checkpoint, all checked; nothing written."""
    cfg = _new_run_config(args)
    data = args.data or cfg.data.path or DEFAULT_DATA
    cfg.data.path = str(Path(data).expanduser().resolve())
    run_dir = Path(args.run or Path("runs") / Path(args.config or "run").stem)
    if run_exists(run_dir):
        raise ConfigError(f"run {run_dir} already exists; continue it with `workbench train --resume {run_dir}` "
                          "or pick another --run")
    dataset = _open_dataset(cfg)
    if args.init_from:
        from workbench.engine import checkpoint

        _check_checkpoint_fits(checkpoint.resolve(args.init_from), cfg, dataset.tokenizer.sha256)
    config_mod.validate(cfg)
    _check_device(cfg)
    return cfg, run_dir, dataset


def prepare_resume(args):
    """The run's config with --max-steps/--set applied, its data and latest checkpoint, all checked."""
    from workbench.engine import checkpoint
    from workbench.engine.rundir import RunDir

    if args.config or args.init_from or args.data:
        raise ConfigError("--resume takes the run's own config and data; only --max-steps and --set can change")
    run = RunDir.at(args.resume)
    if not run.exists():
        raise ConfigError(f"no run at {args.resume} to resume (no config.toml there)")
    cfg = config_mod.load(run.config)
    if args.set or args.max_steps is not None:
        cfg = config_mod.from_dict(_merge_overrides(cfg, _overrides(args)))
    dataset = _open_dataset(cfg)
    _check_device(cfg)
    latest = run.latest_checkpoint()
    if latest is not None:
        step = int(checkpoint.read_state(latest)["step"])
        if step >= cfg.train.max_steps:
            raise ConfigError(f"run {args.resume} is already at step {step} of {cfg.train.max_steps}; "
                              f"pass --max-steps N (N > {step}) to train further")
        _check_checkpoint_fits(latest, cfg, dataset.tokenizer.sha256)
    return cfg, run, dataset


def run(args) -> int:
    from workbench.engine.rundir import RunDir, atomic_write_text

    if args.resume:
        from workbench.engine.process.host import refuse_if_running  # before anything of the running run is rewritten

        refuse_if_running(args.resume)
        cfg, run_dir, dataset = prepare_resume(args)
        atomic_write_text(run_dir.config, config_mod.to_toml(cfg))  # --max-steps / --set now belong to the run
        root, resume = run_dir.root, True
    else:
        cfg, root, dataset = prepare_new_run(args)

        RunDir.at(root).write_run_files(cfg, dataset.tokenizer)
        resume = False
    if args.detach:
        from workbench.engine.process.host import spawn_detached

        pid = spawn_detached(root, None if resume else cfg, resume=resume, init_from=args.init_from)
        print(f"training {root} in the background (engine pid {pid}); watch it with `workbench attach {root}`")
        return 0
    from workbench.engine.process.host import host  # the engine's lock, control socket and system stats, in the foreground too

    state = host(root, cfg, resume=resume, init_from=args.init_from)
    print(f"run {root}: {state}")
    return 0
