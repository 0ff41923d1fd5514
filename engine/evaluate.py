"""Validation: loss, perplexity, bits per byte, and the documents the model finds hardest.

The val split is cut into fixed, non-overlapping windows of seq_len tokens (the same
windows every time, so numbers from different steps and runs compare). Every target
token gets its own loss; from those:
  val_loss  the mean over all targets,   val_ppl  exp(val_loss),
  val_bpb   sum of loss over targets that stand for text (token_bytes > 0, so special
            tokens are left out) / (ln 2 * their UTF-8 bytes), as nanochat's
            loss_eval does: it does not depend on the tokenizer, so any two runs compare.
Per document (val_docs: start, token count), the same ratio ranks the worst documents.

A chat dataset (dataset.chat) is evaluated by its val rows instead (the first ones, the same every
time), on assistant tokens only: a target counts where the loss mask is 1 (assistant content and its
<|end|>), so val_loss is the mean over those, val_bpb their text loss over their UTF-8 bytes, `tokens`
their number, and the worst documents are the worst val conversations by that bits per byte.

The command is engine/cli/eval.py.
"""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2)


def val_windows(n_tokens: int, seq_len: int, batch_size: int, max_batches: int) -> tuple[int, int]:
    """(number of windows, window length) for a val split; max_batches 0 = all of it."""
    length = min(seq_len, n_tokens - 1)
    if length < 1:
        return 0, 0
    windows = (n_tokens - 1) // length
    if max_batches:
        windows = min(windows, max_batches * batch_size)
    return windows, length


def token_losses(model, val: np.ndarray, batch_size: int, seq_len: int, max_batches: int,
                 device) -> np.ndarray:
    """Loss of every target in the evaluated windows: element j is the loss of predicting val[j + 1]."""
    import torch

    windows, length = val_windows(len(val), seq_len, batch_size, max_batches)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, windows, batch_size):
                starts = np.arange(first, min(first + batch_size, windows)) * length
                chunk = np.asarray(val[starts[:, None] + np.arange(length + 1)], dtype=np.int64)
                chunk = torch.from_numpy(chunk).to(device.device)
                with device.autocast():
                    loss = model(chunk[:, :-1], chunk[:, 1:])
                out.append(loss.float().cpu().numpy().reshape(-1))
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def summarize(losses: np.ndarray, val: np.ndarray, token_bytes: np.ndarray) -> dict:
    """val_loss, val_ppl and val_bpb from per-target losses (see the module docstring)."""
    n = len(losses)
    if n == 0:
        return {"val_loss": None, "val_ppl": None, "val_bpb": None, "tokens": 0}
    nbytes = token_bytes[np.asarray(val[1:n + 1], dtype=np.int64)]
    text = nbytes > 0
    mean = float(losses.mean(dtype=np.float64))
    total_bytes = int(nbytes[text].sum())
    bpb = float(losses[text].sum(dtype=np.float64) / (LN2 * total_bytes)) if total_bytes else None
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0)), "val_bpb": bpb, "tokens": n}


def worst_documents(losses: np.ndarray, val: np.ndarray, token_bytes: np.ndarray, val_docs: np.ndarray,
                    sources: list[dict], n: int) -> list[dict]:
    """The `n` fully evaluated val documents with the highest bits per byte."""
    if n <= 0 or len(losses) == 0:
        return []
    nbytes = token_bytes[np.asarray(val[1:len(losses) + 1], dtype=np.int64)].astype(np.float64)
    text_loss = np.where(nbytes > 0, losses.astype(np.float64), 0.0)
    cum_loss = np.concatenate([[0.0], np.cumsum(text_loss)])
    cum_bytes = np.concatenate([[0.0], np.cumsum(nbytes)])
    starts, counts = val_docs[:, 0], val_docs[:, 1]
    # A document's targets are val[start .. start+count-1], i.e. losses[start-1 .. start+count-2].
    lo = np.maximum(starts - 1, 0)
    hi = starts + counts - 1
    covered = hi <= len(losses)
    lo, hi = lo[covered], hi[covered]
    doc_bytes = cum_bytes[hi] - cum_bytes[lo]
    doc_bpb = np.where(doc_bytes > 0, (cum_loss[hi] - cum_loss[lo]) / (LN2 * np.maximum(doc_bytes, 1)), -1.0)
    index = np.flatnonzero(covered)
    order = np.argsort(-doc_bpb, kind="stable")[:n]
    out = []
    for k in order:
        if doc_bpb[k] < 0:
            break
        i = int(index[k])
        src = sources[i] if i < len(sources) else {}
        out.append({"doc": i, "source": src.get("source", "?"), "preview": src.get("preview", ""),
                    "bpb": float(doc_bpb[k]), "bytes": int(doc_bytes[k]), "tokens": int(counts[i])})
    return out


def chat_token_losses(model, tokens: np.ndarray, mask: np.ndarray, batch_size: int, max_batches: int,
                      device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(losses, targets, weights), each (rows, row_tokens - 1), over the first rows of a chat split
    (max_batches 0 = all): losses[r, t] is the loss of predicting tokens[r, t + 1], 0 where weights is 0."""
    import torch

    n = len(tokens) if not max_batches else min(len(tokens), max_batches * batch_size)
    losses, targets, weights = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, n, batch_size):
                chunk = np.asarray(tokens[first:first + batch_size], dtype=np.int64)
                w = np.asarray(mask[first:first + batch_size, 1:], dtype=np.float64)
                y = np.where(w > 0, chunk[:, 1:], -1)
                x, y_t = (torch.from_numpy(a).to(device.device) for a in (chunk[:, :-1], y))
                with device.autocast():
                    loss = model(x, y_t)
                losses.append(loss.float().cpu().numpy().astype(np.float64) * w)
                targets.append(chunk[:, 1:])
                weights.append(w)
    finally:
        model.train(was_training)
    if not losses:
        empty = np.zeros((0, max(0, tokens.shape[1] - 1)))
        return empty, empty.astype(np.int64), empty
    return np.concatenate(losses), np.concatenate(targets), np.concatenate(weights)


def summarize_chat(losses: np.ndarray, targets: np.ndarray, weights: np.ndarray, token_bytes: np.ndarray) -> dict:
    """val_loss, val_ppl, val_bpb over the trained (assistant) targets only."""
    n = int(weights.sum())
    if n == 0:
        return {"val_loss": None, "val_ppl": None, "val_bpb": None, "tokens": 0, "scope": "assistant tokens"}
    nbytes = token_bytes[targets] * weights
    mean = float(losses.sum() / n)
    total_bytes = float(nbytes.sum())
    bpb = float(losses[nbytes > 0].sum() / (LN2 * total_bytes)) if total_bytes else None
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0)), "val_bpb": bpb, "tokens": n,
            "scope": "assistant tokens"}


def worst_conversations(losses: np.ndarray, targets: np.ndarray, weights: np.ndarray, token_bytes: np.ndarray,
                        val_docs: np.ndarray, sources: list[dict], n: int) -> list[dict]:
    """The `n` evaluated val conversations with the highest bits per byte on their assistant tokens."""
    if n <= 0 or len(losses) == 0:
        return []
    rows, width = losses.shape
    # Flat val.bin layout: rows of width + 1 tokens; target t of row r is token r * (width + 1) + t + 1.
    flat_loss = np.zeros(rows * (width + 1))
    flat_bytes = np.zeros(rows * (width + 1))
    nbytes = token_bytes[targets] * weights
    flat_loss.reshape(rows, width + 1)[:, 1:] = np.where(nbytes > 0, losses, 0.0)
    flat_bytes.reshape(rows, width + 1)[:, 1:] = nbytes
    cum_loss = np.concatenate([[0.0], np.cumsum(flat_loss)])
    cum_bytes = np.concatenate([[0.0], np.cumsum(flat_bytes)])
    starts, counts = val_docs[:, 0], val_docs[:, 1]
    covered = starts + counts <= len(flat_loss)
    lo, hi = starts[covered], (starts + counts)[covered]
    conv_bytes = cum_bytes[hi] - cum_bytes[lo]
    conv_bpb = np.where(conv_bytes > 0, (cum_loss[hi] - cum_loss[lo]) / (LN2 * np.maximum(conv_bytes, 1)), -1.0)
    index = np.flatnonzero(covered)
    out = []
    for k in np.argsort(-conv_bpb, kind="stable")[:n]:
        if conv_bpb[k] < 0:
            break
        i = int(index[k])
        src = sources[i] if i < len(sources) else {}
        out.append({"doc": i, "source": src.get("source", "?"), "preview": src.get("preview", ""),
                    "bpb": float(conv_bpb[k]), "bytes": int(conv_bytes[k]), "tokens": int(counts[i])})
    return out


def evaluate(model, dataset, batch_size: int, seq_len: int, max_batches: int, device, worst: int = 0) -> dict:
    """Everything above in one pass over the val windows (a chat dataset: its val rows, assistant tokens)."""
    if dataset.chat is not None:
        tokens, mask = dataset.rows("val")
        losses, targets, weights = chat_token_losses(model, tokens, mask, batch_size, max_batches, device)
        result = summarize_chat(losses, targets, weights, dataset.token_bytes)
        if worst:
            result["worst_docs"] = worst_conversations(losses, targets, weights, dataset.token_bytes,
                                                       dataset.val_docs, dataset.val_sources(), worst)
        return result
    losses = token_losses(model, dataset.val, batch_size, seq_len, max_batches, device)
    result = summarize(losses, dataset.val, dataset.token_bytes)
    if worst:
        result["worst_docs"] = worst_documents(losses, dataset.val, dataset.token_bytes, dataset.val_docs,
                                               dataset.val_sources(), worst)
    return result
