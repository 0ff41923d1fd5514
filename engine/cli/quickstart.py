"""`workbench quickstart`: the whole pipeline in one command, on whatever hardware is here.

Prepares the built-in corpus (Python's own documentation: no download) unless it is
already prepared, trains the `tiny` preset for a few hundred steps (CUDA if present,
else the CPU: a few minutes on two cores), then prints a sample. An existing run is
never overwritten: the next free name (runs/quickstart-2, ...) is used instead.
The recipe itself is engine/quickstart.py (the TUI's quick start uses it too).

`--chat` goes on from the base run: the built-in chat data prepared with its tokenizer, chat
fine-tuning with the SFT recipe (examples/sft-cpu.toml) into RUN-chat, then a first reply.
"""

from __future__ import annotations

import sys
from pathlib import Path

from workbench.engine.errors import ConfigError
from workbench.engine.quickstart import (
    CHAT_PROMPT,
    DEFAULT_STEPS,
    SAMPLE_PROMPT,
    SFT_STEPS,
    ensure_builtin_chat_data,
    ensure_builtin_data,
    first_reply,
    free_run_dir,
    quickstart_config,
    sft_config,
)


def add_arguments(parser) -> None:
    parser.add_argument("--run", default="runs/quickstart", metavar="DIR",
                        help="run folder (default runs/quickstart; a free name is picked if it exists)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N", help="training steps")
    parser.add_argument("--data", default="data/builtin", metavar="DIR",
                        help="where the built-in corpus is (or will be) prepared")
    parser.add_argument("--chat", action="store_true",
                        help="then chat fine-tune it on the built-in conversations (into RUN-chat) and print a reply")
    parser.add_argument("--chat-steps", type=int, default=SFT_STEPS, metavar="N", help="chat fine-tuning steps")
    parser.add_argument("--chat-data", default="data/builtin-chat", metavar="DIR",
                        help="where the built-in chat data is (or will be) prepared with the base run's tokenizer")


def run(args) -> int:
    if args.steps < 1 or args.chat_steps < 1:
        raise ConfigError(f"--steps and --chat-steps must be at least 1, got {args.steps} and {args.chat_steps}")
    data = Path(args.data).expanduser().resolve()
    ensure_builtin_data(data)
    cfg = quickstart_config(args.steps, data)
    run_dir = free_run_dir(Path(args.run))

    from workbench.engine.checkpoint import open_run_model
    from workbench.engine.cli.sample import generate_samples
    from workbench.engine.run_setup import create_run
    from workbench.engine.train import train

    print(f"training the tiny preset in {run_dir} for {args.steps} steps", flush=True)
    state = train(create_run(run_dir, cfg))
    if state != "finished":
        print(f"run {run_dir}: {state}; continue it with `workbench train --resume {run_dir}`")
        return 0
    loaded = open_run_model(run_dir)
    text = generate_samples(loaded, SAMPLE_PROMPT, 1, 120, 0.8, 0, 0.95, seed=0)[0]
    print("\na sample from the trained model:\n")
    print(SAMPLE_PROMPT + text)
    if args.chat:
        return chat(args, run_dir)
    print(f"\nnext: workbench sample {run_dir} --prompt \"...\"   |   workbench eval {run_dir}   |   "
          f"workbench train --resume {run_dir} --max-steps {2 * args.steps}")
    sys.stdout.flush()
    return 0


def chat(args, base_run: Path) -> int:
    """The --chat half: chat data with the base run's tokenizer, fine-tuning from it, a first reply."""
    from workbench.engine.run_setup import create_run
    from workbench.engine.train import train

    data = Path(args.chat_data).expanduser().resolve()
    ensure_builtin_chat_data(data, base_run)
    run_dir = free_run_dir(base_run.with_name(base_run.name + "-chat"))
    cfg = sft_config(args.chat_steps, data)
    print(f"\nchat fine-tuning {base_run} in {run_dir} for {args.chat_steps} steps", flush=True)
    state = train(create_run(run_dir, cfg, init_from=base_run), init_from=base_run)
    if state != "finished":
        print(f"run {run_dir}: {state}; continue it with `workbench train --resume {run_dir}`")
        return 0
    print(f"\nthe chat model's first reply:\n\nuser: {CHAT_PROMPT}\nassistant: {first_reply(run_dir)}")
    print(f"\nnext: workbench chat {run_dir}   |   workbench eval {run_dir}")
    sys.stdout.flush()
    return 0
