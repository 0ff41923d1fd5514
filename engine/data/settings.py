"""Every knob of `workbench prepare`, with its default (the CLI flags mirror these names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from workbench.engine.config import ModelConfig
from workbench.engine.errors import DataError

DEFAULT_CHAT_SEQ_LEN = ModelConfig().seq_len  # the default model's context (the tiny preset's too)
MIN_CHAT_SEQ_LEN = 16  # room for a short question and answer


@dataclass
class PrepareSettings:
    vocab_size: int = 4096
    tokenizer: str = "bpe"  # bpe | unigram
    val_fraction: float = 0.05
    val_sources: list[str] = field(default_factory=list)  # if set, these are the val split
    doc_chars: int = 8000  # text files are cut into documents of about this size (sources.py)
    min_chars: int = 50
    max_line_chars: int = 10000
    min_alpha_frac: float = 0.4
    max_dup_line_frac: float = 0.3
    max_dup_ngram_frac: float = 0.3
    blocklist: str | None = None
    near_dedup: bool = True
    near_dup_threshold: float = 0.8
    tokenizer_from: str | None = None  # reuse this tokenizer (a dataset or run folder, or a .model) instead of training
    tokenizer_sample_mb: float = 10.0  # SentencePiece trains on a sample of at most this much text
    threads: int = 0  # SentencePiece threads; 0 = all cores
    workers: int = 0  # processes for cleaning/filtering; 0 = all cores when the input is over 8 MB, else 1
    force: bool = False  # replace a non-empty `out`
    # Chat data (chat sources are told apart in sources.py; the pipeline is in prepare.py):
    builtin_chat: bool = False  # add the built-in conversations (builtin_chat.py)
    flatten_chat: bool = False  # read chat records as plain text, every token trained (as before chat data)
    seq_len: int = 0  # chat rows hold seq_len + 1 tokens; 0 = the --tokenizer-from run's model.seq_len, else 128

    @classmethod
    def from_any(cls, value) -> PrepareSettings:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise DataError(f"unknown prepare setting(s): {', '.join(unknown)}")
        return cls(**value)

    def validate(self) -> None:
        if self.tokenizer not in ("bpe", "unigram"):
            raise DataError(f"--tokenizer must be bpe or unigram, not {self.tokenizer!r}")
        if not 0 < self.val_fraction <= 0.5:
            raise DataError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction}")
        for name in ("min_alpha_frac", "max_dup_line_frac", "max_dup_ngram_frac", "near_dup_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.doc_chars < 100:
            raise DataError(f"doc_chars must be at least 100, got {self.doc_chars}")
        if self.threads < 0 or self.workers < 0:
            raise DataError("threads and workers must be 0 (automatic) or more")
        if self.tokenizer_sample_mb <= 0:
            raise DataError("tokenizer_sample_mb must be positive")
        if self.seq_len < 0 or 0 < self.seq_len < MIN_CHAT_SEQ_LEN:
            raise DataError(f"--seq-len must be at least {MIN_CHAT_SEQ_LEN} (or 0: automatic), got {self.seq_len}")
        if self.builtin_chat and self.flatten_chat:
            raise DataError("--builtin-chat makes chat data: it cannot be combined with --flatten-chat")
