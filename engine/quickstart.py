"""The quick start's recipe, shared by `workbench quickstart` (engine/cli/quickstart.py) and the TUI.

Prepares the built-in corpus (Python's own documentation: no download) unless it is
already prepared, trains the `tiny` preset for a few hundred steps (CUDA if present,
else the CPU: a few minutes on two cores), then prints a sample. An existing run is
never overwritten: the next free name (runs/quickstart-2, ...) is used instead.
"""

from __future__ import annotations

from pathlib import Path

from workbench.engine.errors import ConfigError

DEFAULT_STEPS = 300
SAMPLE_PROMPT = "The "


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
    print(f"  {kept['documents']:,} documents, {kept['bytes'] / 1e6:.1f} MB, {kept['tokens']:,} tokens "
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
