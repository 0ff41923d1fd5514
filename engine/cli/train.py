"""`workbench train`: start a run, resume one, or fine-tune from a checkpoint.

    workbench train CONFIG --data D --run R [--max-steps N] [--set section.key=value]...
    workbench train --resume R [--max-steps N]
    workbench train [CONFIG] --init-from RUN_OR_CHECKPOINT --data D --run R
    ... --detach                      (the detached engine: workbench.engine.process.spawn)

This module turns arguments into a config; workbench.engine.run_setup checks it (data,
device, checkpoint shapes, tokenizer) before anything is written and writes the run's
config.toml, which is all the engine reads. A failed start leaves no half run and never
touches an existing one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.engine import config as config_mod
from workbench.engine.errors import ConfigError

DEFAULT_DATA = "data/builtin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (e.g. examples/tiny-cpu.toml); not with --resume")
    parser.add_argument("--data", metavar="DIR",
                        help=f"prepared dataset folder (default: data.path, else {DEFAULT_DATA})")
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


def run(args) -> int:
    from workbench.engine.process.lock import refuse_if_running
    from workbench.engine.run_setup import check_resume, create_run

    if args.resume:
        if args.config or args.init_from or args.data:
            raise ConfigError("--resume takes the run's own config and data; only --max-steps and --set can change")
        refuse_if_running(args.resume)  # before anything of the running run is rewritten
        root, resume = check_resume(args.resume, _overrides(args)), True
    else:
        cfg = _new_run_config(args)
        cfg.data.path = args.data or cfg.data.path or DEFAULT_DATA
        run_dir = Path(args.run or Path("runs") / Path(args.config or "run").stem)
        root, resume = create_run(run_dir, cfg, init_from=args.init_from), False
    if args.detach:
        from workbench.engine.process.spawn import spawn_detached

        pid = spawn_detached(root, resume=resume, init_from=args.init_from)
        print(f"training {root} in the background (engine pid {pid}); watch it with `workbench attach {root}`")
        return 0
    from workbench.engine.process.host import host  # the engine's lock, control socket and stats, in the foreground too

    state = host(root, resume=resume, init_from=args.init_from)
    print(f"run {root}: {state}")
    return 0
