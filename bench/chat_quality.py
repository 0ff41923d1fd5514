"""Chat fine-tuning quality on held-out built-in conversations, and `workbench quickstart --chat`'s wall time.

    python bench/chat_quality.py --base runs/quickstart --chat runs/quickstart-chat
    python bench/chat_quality.py --quickstart /tmp/qs     # runs `workbench quickstart --chat` there first, timed

On the chat run's val split (conversations held out by module: no val answer is trained on):
  - the assistant-token val loss (and bits per byte) of the chat model and of the base checkpoint it was
    fine-tuned from, both over every val row with the loss mask (workbench.engine.evaluate);
  - the share of held-out prompts whose greedy reply ends with <|end|> within --max-tokens (and the
    context): each val conversation's first user turn (with its system message, if any) rendered as a
    generation prompt, as a chat would send it.
The last line is `chat_val_loss=X base_val_loss=Y end_rate=Z [wall_s=W]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def val_losses(base_run: Path, chat_run: Path) -> dict:
    """Assistant-token val metrics of the chat run's latest checkpoint and of the base run's, on the chat val split."""
    from workbench.engine.checkpoint import open_run_model
    from workbench.engine.data.dataset import Dataset
    from workbench.engine.evaluate import evaluate

    chat = open_run_model(chat_run, need_data=True)
    dataset = chat.dataset
    out = {"chat": evaluate(chat.model, dataset, chat.cfg.train.batch_size, chat.cfg.model.seq_len, 0, chat.device)}
    base = open_run_model(base_run)
    dataset.check_seq_len(base.cfg.model.seq_len)
    if base.tokenizer.sha256 != dataset.tokenizer.sha256:
        raise SystemExit(f"{base_run} has another tokenizer than the chat data {dataset.path}")
    out["base"] = evaluate(base.model, Dataset.open(dataset.path), chat.cfg.train.batch_size, base.cfg.model.seq_len,
                           0, base.device)
    return out


def held_out_prompts(dataset, limit: int) -> list[list[int]]:
    """The first turn of each val conversation (up to `limit`) as generation prompt ids, ending in <|assistant|>."""
    from workbench.engine.chat import ChatTemplate

    assistant = ChatTemplate(dataset.tokenizer).assistant_id
    prompts, seen = [], set()
    for ids, _ in dataset.conversations("val"):
        ids = [int(i) for i in ids]
        if assistant not in ids:
            continue
        prompt = ids[: ids.index(assistant) + 1]
        if tuple(prompt) not in seen:
            seen.add(tuple(prompt))
            prompts.append(prompt)
        if len(prompts) >= limit:
            break
    return prompts


def end_token_rate(chat_run: Path, max_tokens: int, limit: int) -> dict:
    """Share of held-out prompts whose greedy reply ends with <|end|> within max_tokens (and the context)."""
    import torch

    from workbench.engine.chat import ChatTemplate
    from workbench.engine.checkpoint import open_run_model

    loaded = open_run_model(chat_run, need_data=True)
    template = ChatTemplate(loaded.tokenizer)
    seq_len = loaded.cfg.model.seq_len
    prompts = held_out_prompts(loaded.dataset, limit)
    ended, lengths, t0 = 0, [], time.perf_counter()
    loaded.model.eval()
    with torch.inference_mode():
        for prompt in prompts:
            budget = min(max_tokens, seq_len - len(prompt))
            out = loaded.model.generate(prompt, budget + 1, temperature=0.0, stop_ids=[template.end_id])
            # generate leaves the stop token out: a reply that ended with <|end|> within budget is at most budget long
            ended += len(out) <= budget
            lengths.append(len(out))
    return {"prompts": len(prompts), "ended": ended, "end_rate": ended / max(1, len(prompts)),
            "mean_reply_tokens": sum(lengths) / max(1, len(lengths)), "max_tokens": max_tokens,
            "seconds": round(time.perf_counter() - t0, 1),
            "example": {"prompt": template._text(prompts[0]) if prompts else "",
                        "reply": template.reply_text(loaded.model.generate(prompts[0], max_tokens, temperature=0.0,
                                                                           stop_ids=[template.end_id]))
                        if prompts else ""}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/quickstart", help="the base run the chat run was fine-tuned from")
    parser.add_argument("--chat", default="runs/quickstart-chat", help="the chat run")
    parser.add_argument("--quickstart", metavar="DIR",
                        help="first run `workbench quickstart --chat` in DIR (empty or new), timed; then measure it")
    parser.add_argument("--max-tokens", type=int, default=128, help="reply budget for the end-token rate")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts to reply to")
    args = parser.parse_args()
    base, chat, wall = Path(args.base), Path(args.chat), None
    if args.quickstart:
        folder = Path(args.quickstart)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "workbench.cli", "quickstart", "--chat"], cwd=folder, check=True)
        wall = time.perf_counter() - t0
        base, chat = folder / "runs" / "quickstart", folder / "runs" / "quickstart-chat"
    losses = val_losses(base, chat)
    rate = end_token_rate(chat, args.max_tokens, args.prompts)
    print(json.dumps({"val": losses, "end_token": rate, "wall_s": wall}, indent=1))
    line = (f"chat_val_loss={losses['chat']['val_loss']:.4f} base_val_loss={losses['base']['val_loss']:.4f} "
            f"end_rate={rate['end_rate']:.3f}")
    print(line + (f" wall_s={wall:.1f}" if wall is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
