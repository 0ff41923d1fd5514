"""`workbench eval RUN [--checkpoint NAME] [--worst N] [--max-batches N] [--json]`.

Val loss, perplexity and bits per byte (engine/evaluate.py), from a checkpoint, or from a
running engine's current weights when one runs (its periodic pass).
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.engine.errors import ConfigError
from workbench.engine.process import client
from workbench.engine.process.ops import OPS


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (runs/NAME)")
    parser.add_argument("--checkpoint", help="checkpoint name (default: the latest), e.g. step_000300")
    parser.add_argument("--worst", type=int, default=None, metavar="N",
                        help="show the N val documents with the highest bits per byte (default: eval.worst_docs)")
    parser.add_argument("--max-batches", type=int, default=0, metavar="N",
                        help="evaluate at most N batches (default 0: the whole val split)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from workbench.engine.checkpoint import open_run_model
    from workbench.engine.evaluate import evaluate

    if args.max_batches < 0 or (args.worst is not None and args.worst < 0):
        raise ConfigError("--max-batches and --worst must not be negative")
    if (done := live_eval(args)) is not None:
        return done
    loaded = open_run_model(args.run, args.checkpoint, need_data=True)
    cfg = loaded.cfg
    worst = cfg.eval.worst_docs if args.worst is None else args.worst
    result = evaluate(loaded.model, loaded.dataset, cfg.train.batch_size, cfg.model.seq_len,
                      args.max_batches, loaded.device, worst=worst)
    result["checkpoint"] = str(loaded.checkpoint)
    result["step"] = loaded.state.get("step")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"run {args.run}, checkpoint {Path(loaded.checkpoint).name} (step {result['step']})")
    if not result["tokens"]:
        print("the val split is too short to evaluate")
        return 0
    bpb = "n/a" if result["val_bpb"] is None else f"{result['val_bpb']:.4f}"
    chat = result.get("scope") == "assistant tokens"  # a chat dataset: only the assistant's tokens count
    print(f"val loss {result['val_loss']:.4f} | perplexity {result['val_ppl']:.2f} | "
          f"bits per byte {bpb} | {result['tokens']:,} {'assistant ' if chat else ''}tokens")
    docs = result.get("worst_docs") or []
    if docs:
        print(f"worst {len(docs)} validation {'conversations' if chat else 'documents'} by bits per byte:")
        for d in docs:
            preview = " ".join(d["preview"].split())[:60]
            print(f"  {d['bpb']:6.3f} bpb  {d['bytes']:>7,} bytes  {d['source']}  {preview!r}")
    return 0


def live_eval(args) -> int | None:
    """A validation pass in the running engine (its periodic eval: eval.max_batches batches);
    None if no engine runs or a checkpoint, a full pass or --worst documents (which the engine's
    pass does not rank) were asked for."""
    if (getattr(args, "checkpoint", None) or getattr(args, "max_batches", 0) or getattr(args, "worst", None)
            or not client.engine_alive(args.run)):
        return None
    try:
        reply = client.request(args.run, "eval", timeout=OPS["eval"].timeout_s)
    except client.EngineNotRunning:
        return None
    metrics = reply.get("metrics") or {}
    if args.json:
        print(json.dumps({"checkpoint": "live", **metrics, "step": reply["step"]}))
        return 0
    print(f"run {args.run}, live engine (step {reply['step']})")
    if metrics.get("val_loss") is None:
        print("the val split is too short to evaluate")
        return 0
    bpb = "n/a" if metrics.get("val_bpb") is None else f"{metrics['val_bpb']:.4f}"
    print(f"val loss {metrics['val_loss']:.4f} | perplexity {metrics['val_ppl']:.2f} | bits per byte {bpb}")
    return 0
