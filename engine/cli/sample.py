"""`workbench sample RUN --prompt "To be" -n 3 --temperature 0.8 --top-p 0.95`: text from a run's checkpoint.

Loads the latest (or `--checkpoint NAME`) weights with the run's own tokenizer copy, so
it works wherever the run folder is, even after the training data moved. Each sample
starts from <|bos|> + the prompt and stops at <|end|> or after --max-tokens.
"""

from __future__ import annotations

import json
import secrets

from workbench.engine.errors import ConfigError
from workbench.engine.formatting import terminal_safe
from workbench.engine.process import client
from workbench.engine.process.ops import OPS


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (runs/NAME)")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, metavar="N", help="how many samples")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K likeliest tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1 = off)")
    parser.add_argument("--max-tokens", type=int, default=200, metavar="M", help="tokens per sample")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="same seed, same samples")
    parser.add_argument("--checkpoint", metavar="NAME", help="checkpoint name (default: the latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample")


def check_args(args) -> None:
    if args.num_samples < 1:
        raise ConfigError(f"-n must be at least 1, got {args.num_samples}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must not be negative, got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must not be negative, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must not be negative, got {args.seed}")


def generate_samples(loaded, prompt: str, n: int, max_tokens: int, temperature: float, top_k: int,
                     top_p: float, seed: int | None) -> list[str]:
    tok = loaded.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    texts = []
    for i in range(n):
        with loaded.device.autocast():
            out = loaded.model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        stop_ids=[tok.end_id], seed=None if seed is None else seed + i)
        texts.append(tok.decode(out))
    return texts


def run(args) -> int:
    check_args(args)
    if args.seed is None:  # a drawn seed, reported, so any sample can be reproduced
        args.seed = secrets.randbelow(2**31)

    if (done := live_sample(args)) is not None:
        return done
    from workbench.engine.checkpoint import open_run_model

    loaded = open_run_model(args.run, args.checkpoint)
    texts = generate_samples(loaded, args.prompt, args.num_samples, args.max_tokens, args.temperature,
                             args.top_k, args.top_p, args.seed)
    for i, text in enumerate(texts):
        if args.json:
            print(json.dumps({"run": args.run, "checkpoint": loaded.checkpoint.name, "step": loaded.state.get("step"),
                              "prompt": args.prompt, "text": text, "temperature": args.temperature,
                              "top_k": args.top_k, "top_p": args.top_p,
                              "seed": None if args.seed is None else args.seed + i}))
        else:
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ({loaded.checkpoint.name}) ---")
            print(terminal_safe(args.prompt + text))
    return 0


def live_sample(args) -> int | None:
    """Sample from the running engine's current weights; None if no engine runs (or --checkpoint asks
    for a saved one), so that the caller samples from a checkpoint instead."""
    if getattr(args, "checkpoint", None) or not client.engine_alive(args.run):
        return None
    texts = []
    try:
        for i in range(args.num_samples):
            seed = None if args.seed is None else args.seed + i
            reply = client.request(args.run, "sample", timeout=OPS["sample"].timeout_s, prompt=args.prompt,
                                   max_tokens=args.max_tokens,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)
            texts.append((reply, seed))
    except client.EngineNotRunning:
        if texts:
            raise
        return None  # it ended in the meantime: its checkpoints are all there
    for i, (reply, seed) in enumerate(texts):
        if args.json:
            print(json.dumps({"run": args.run, "checkpoint": "live", "step": reply["step"], "prompt": args.prompt,
                              "text": reply["text"], "temperature": args.temperature, "top_k": args.top_k,
                              "top_p": args.top_p, "seed": seed}))
        else:
            if args.num_samples > 1:
                print(f"--- sample {i + 1} (live engine, step {reply['step']}) ---")
            print(terminal_safe(args.prompt + reply["text"]))
    return 0
