"""`workbench prepare --source PATH ... --out DIR`: text in, a prepared dataset out.

The pipeline is engine/data/prepare.py (sources, cleaning, filters, dedup, the tokenizer,
token shards, the report); this module turns arguments into its settings and shows its
progress: one line per stage on a terminal, or one JSON object a line for the TUI.
Chat data (JSONL `messages` or `prompt`/`completion`, or --builtin-chat) is told apart by
engine/data/sources.py; `--show N` prints N of its packed conversations with the trained
tokens marked (green on a terminal, [[in brackets]] otherwise).
"""

from __future__ import annotations

import itertools
import json
import os
import sys

from workbench.engine.chat import ChatTemplate
from workbench.engine.data.dataset import Dataset
from workbench.engine.data.prepare import prepare
from workbench.engine.data.report import render_text
from workbench.engine.data.settings import DEFAULT_CHAT_SEQ_LEN, PrepareSettings
from workbench.engine.errors import DataError
from workbench.engine.formatting import nbytes


def add_arguments(parser) -> None:
    d = PrepareSettings()
    parser.add_argument("--source", action="append", default=[], metavar="PATH",
                        help="a .txt/.md/.jsonl file or a folder (repeatable); none: the built-in corpus. JSONL "
                             "whose records have `messages` or `prompt`/`completion` is chat data")
    parser.add_argument("--out", required=True, metavar="DIR", help="the prepared dataset folder to create")
    parser.add_argument("--val-source", action="append", default=[], metavar="PATH",
                        help="use these sources as the val split instead of a hashed fraction")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size, metavar="N",
                        help="tokenizer vocabulary, special and byte tokens included (default %(default)s)")
    parser.add_argument("--tokenizer", choices=("bpe", "unigram"), default=d.tokenizer,
                        help="SentencePiece model type (default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, metavar="F",
                        help="share of documents held out for validation (default %(default)s)")
    parser.add_argument("--blocklist", metavar="FILE", help="drop documents with any of these words (one a line)")
    parser.add_argument("--doc-chars", type=int, default=d.doc_chars, metavar="N",
                        help="text files are cut into documents of about N characters (default %(default)s)")
    parser.add_argument("--min-chars", type=int, default=d.min_chars, metavar="N",
                        help="drop documents shorter than this (default %(default)s)")
    parser.add_argument("--max-line-chars", type=int, default=d.max_line_chars, metavar="N",
                        help="drop documents with a longer line (default %(default)s)")
    parser.add_argument("--min-alpha-frac", type=float, default=d.min_alpha_frac, metavar="F",
                        help="drop documents with fewer letters than this share (default %(default)s)")
    parser.add_argument("--max-dup-line-frac", type=float, default=d.max_dup_line_frac, metavar="F",
                        help="drop documents with more repeated lines than this share (default %(default)s)")
    parser.add_argument("--max-dup-ngram-frac", type=float, default=d.max_dup_ngram_frac, metavar="F",
                        help="drop documents with more repeated n-grams than this share (default %(default)s)")
    parser.add_argument("--near-dup-threshold", type=float, default=d.near_dup_threshold, metavar="F",
                        help="MinHash similarity above which a document is a near duplicate (default %(default)s)")
    parser.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates (exact ones still go)")
    parser.add_argument("--tokenizer-from", metavar="PATH",
                        help="reuse the tokenizer of a prepared dataset or run folder (or a .model file)")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=d.tokenizer_sample_mb, metavar="MB",
                        help="train the tokenizer on at most this much text (default %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads, metavar="N", help="tokenizer threads (0: all cores)")
    parser.add_argument("--workers", type=int, default=d.workers, metavar="N",
                        help="processes for cleaning and filtering (0: all cores for inputs over 8 MB)")
    parser.add_argument("--builtin-chat", action="store_true",
                        help="chat data: conversations about Python made from its own documentation, offline")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, metavar="N",
                        help="chat data: pack conversations into rows of N+1 tokens (default: the --tokenizer-from "
                             f"run's model.seq_len, else {DEFAULT_CHAT_SEQ_LEN})")
    parser.add_argument("--flatten-chat", action="store_true",
                        help="read chat records as plain text, every token trained (no loss mask)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="chat data: print N packed conversations with the trained tokens marked")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="print only the report")
    parser.add_argument("--progress-json", action="store_true",
                        help="print each progress update as one JSON line on stdout (for the TUI)")


class _PrintProgress:
    """One line per stage on stderr, updated in place."""

    def __init__(self):
        self.stage = None

    def __call__(self, event: dict) -> None:
        if event["stage"] == "done":
            return
        if self.stage is not None and event["stage"] != self.stage:
            print(file=sys.stderr)
        self.stage = event["stage"]
        frac = event.get("fraction")
        pct = f"{100 * frac:5.1f}%" if frac is not None else "  ... "
        print(f"\r{self.stage:<9} {pct}  {event['docs']:>9,} docs  {nbytes(event['bytes']):>9}",
              end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.stage is not None:
            print(file=sys.stderr, flush=True)


def _json_progress(event: dict) -> None:
    print(json.dumps(event), flush=True)


def run(args) -> int:
    settings = PrepareSettings(
        vocab_size=args.vocab_size, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        val_sources=args.val_source, doc_chars=args.doc_chars, min_chars=args.min_chars,
        max_line_chars=args.max_line_chars, min_alpha_frac=args.min_alpha_frac,
        max_dup_line_frac=args.max_dup_line_frac, max_dup_ngram_frac=args.max_dup_ngram_frac,
        blocklist=args.blocklist, near_dedup=not args.no_near_dedup, near_dup_threshold=args.near_dup_threshold,
        tokenizer_from=args.tokenizer_from, tokenizer_sample_mb=args.tokenizer_sample_mb, threads=args.threads,
        workers=args.workers, force=args.force, builtin_chat=args.builtin_chat, flatten_chat=args.flatten_chat,
        seq_len=args.seq_len,
    )
    if args.show < 0:
        raise DataError(f"--show must be 0 or more, got {args.show}")
    progress = _json_progress if args.progress_json else None if args.quiet else _PrintProgress()
    try:
        report = prepare(args.source, args.out, settings, progress=progress)
    finally:
        if isinstance(progress, _PrintProgress):
            progress.finish()  # end the in-place progress line before the report or an error
    print(render_text(report), end="")
    print(f"prepared dataset written to {args.out}")
    if args.show:
        show_conversations(args.out, args.show)
    return 0


def show_conversations(path, n: int, color: bool | None = None) -> None:
    """Print `n` packed train conversations of a chat dataset, trained tokens marked."""
    ds = Dataset.open(path)
    if ds.chat is None:
        print("(--show: plain-text data trains on every token; there is nothing to mark)")
        return
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") if color is None else color
    template = ChatTemplate(ds.tokenizer)
    legend = "green" if color else "[[in brackets]]"
    print(f"\n{n} of {ds.chat['conversations']['train']:,} train conversations, trained tokens {legend}:")
    for i, (ids, mask) in enumerate(itertools.islice(ds.conversations("train"), n)):
        print(f"\n--- conversation {i + 1} ({len(ids)} tokens, {int(mask.sum())} trained)")
        print(template.show(ids, mask, color=color))
