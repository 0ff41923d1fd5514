"""The preparation report: report.json (for programs) and report.txt (for people)."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.engine.formatting import nbytes

_INPUT_LABELS = {
    "files_read": "files read",
    "files_skipped_binary": "files skipped: binary",
    "files_skipped_not_utf8": "files skipped: not UTF-8",
    "files_skipped_unreadable": "files skipped: unreadable",
    "files_ignored_type": "files ignored: not .txt/.md/.jsonl",
    "jsonl_records": "JSONL records",
    "jsonl_malformed_lines": "JSONL lines malformed (skipped)",
}


def add_token_estimates(report: dict) -> None:
    """Dropped documents are never tokenized; estimate their tokens from the measured bytes per token."""
    bpt = report["tokenizer"]["bytes_per_token"] or 1.0
    for row in report["dropped"].values():
        row["tokens_est"] = round(row["bytes"] / bpt)


def render_text(report: dict) -> str:
    lines = ["workbench prepare report", ""]
    lines.append("sources: " + (", ".join(report["sources"]) or "built-in corpus"))
    if report.get("val_sources"):
        lines.append("val sources: " + ", ".join(report["val_sources"]))
    lines.append("")
    lines.append("input")
    for key, label in _INPUT_LABELS.items():
        if report["input"].get(key):
            lines.append(f"  {label:<38} {report['input'][key]:>12,}")
    lines.append(f"  {'documents':<38} {report['input']['documents']:>12,}   {nbytes(report['input']['bytes'])}")
    lines.append("")
    lines.append(f"  {'':<24} {'documents':>10} {'bytes':>14} {'tokens':>14}")
    k = report["kept"]
    lines.append(f"  {'kept':<24} {k['documents']:>10,} {k['bytes']:>14,} {k['tokens']:>14,}")
    for reason, row in report["dropped"].items():
        if row["documents"]:
            lines.append(f"  {'dropped: ' + reason:<24} {row['documents']:>10,} {row['bytes']:>14,} "
                         f"{'~' + format(row.get('tokens_est', 0), ','):>14}")
    lines.append("")
    for split in ("train", "val"):
        s = report["splits"][split]
        lines.append(f"  {split:<24} {s['documents']:>10,} {s['bytes']:>14,} {s['tokens']:>14,}")
    t = report["tokenizer"]
    lines.append("")
    reused = report.get("settings", {}).get("tokenizer_from")
    origin = f"reused from {reused}" if reused else f"trained on {nbytes(t['sample_bytes'])}"
    lines.append(f"tokenizer: SentencePiece {t['model_type']}, vocab {t['vocab_size']:,}, "
                 f"{origin}, {t['bytes_per_token']:.3f} bytes per token")
    asked = report.get("settings", {}).get("vocab_size", t["vocab_size"])
    if t["vocab_size"] < asked and not reused:
        lines.append(f"  (vocab {asked:,} was asked for: the corpus is too small to learn that many pieces)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.get("stage_seconds", {}).items())
    rate = nbytes(report["input"]["bytes"] / max(report["seconds"], 1e-9))
    lines.append(f"time: {report['seconds']:.1f} s ({rate}/s of input; {stages})")
    lines.append("(~ tokens of dropped documents are estimated from bytes per token)")
    lines += chat_lines(report)
    return "\n".join(lines) + "\n"


def chat_lines(report: dict) -> list[str]:
    """The chat section of report.txt (report["chat"], written for chat data only); [] for plain text."""
    chat = report.get("chat")
    if not chat:
        return []
    per = chat["per_split"]
    lines = ["", f"chat: template {chat['template']}, rows of {chat['row_tokens']} tokens "
                 f"(seq_len {chat['seq_len']}, from {chat['seq_len_from']}), best-fit packed"]
    lines.append(f"  {'':<32} {'train':>12} {'val':>12}")
    rows = [("conversations", "conversations"), ("multi-turn conversations", "multi_turn"),
            ("system turns", "system_turns"), ("user turns", "user_turns"), ("assistant turns", "assistant_turns"),
            ("rows", "rows"), ("tokens trained (assistant)", "trained_tokens"),
            ("tokens not trained", "untrained_tokens"), ("tokens of padding", "padding_tokens"),
            ("truncated to a row", "truncated"), ("tokens cut by truncation", "truncated_tokens")]
    for label, key in rows:
        values = [chat[key][s] if key == "conversations" else per[s].get(key, 0) for s in ("train", "val")]
        lines.append(f"  {label:<32} {values[0]:>12,} {values[1]:>12,}")
    if chat["dropped"]:
        lines.append("  skipped:")
        for reason, n in chat["dropped"].items():
            lines.append(f"    {reason:<22} {n:>10,}  {chat['reasons'][reason]}")
    return lines


def write_report(out_dir: Path, report: dict) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.txt").write_text(render_text(report))
