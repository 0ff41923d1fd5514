"""Quality filters, in the spirit of the Gopher / C4 rules; each returns the reason it drops a document.

- too_short: fewer than `min_chars` characters;
- line_too_long: a line longer than `max_line_chars` (minified code, base64, tables of numbers);
- low_alpha: letters are less than `min_alpha_frac` of the non-space characters (symbol soup);
- repeated_lines: more than `max_dup_line_frac` of the characters sit in lines seen before in
  the same document (characters, not lines, so short repeated speaker names do not count much);
- repeated_ngrams: more than `max_dup_ngram_frac` of the word 5-grams repeat within the document;
- blocklist: a word or phrase from the blocklist file (one per line, case-insensitive, whole words).
The counts run at C speed where the text is ASCII (bytes.translate), since they see every byte.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from workbench.engine.errors import DataError

REASONS = ("too_short", "line_too_long", "low_alpha", "repeated_lines", "repeated_ngrams", "blocklist")
_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_SPACE = string.whitespace.encode()
_LETTER = re.compile(r"[^\W\d_]")
_SPACE = re.compile(r"\s")


def load_blocklist(path: str | Path | None) -> re.Pattern | None:
    if not path:
        return None
    try:
        words = [w.strip() for w in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DataError(f"blocklist file not found: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"blocklist file is not UTF-8 text: {path}") from None
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def alpha_fraction(text: str) -> float:
    """Letters / non-whitespace characters."""
    if text.isascii():
        data = text.encode("ascii")
        non_space = len(data.translate(None, _ASCII_SPACE))
        letters = non_space - len(data.translate(None, _ASCII_LETTERS + _ASCII_SPACE))
    else:
        non_space = len(text) - _SPACE.subn("", text)[1]
        letters = _LETTER.subn("", text)[1]
    return letters / non_space if non_space else 0.0


def dup_line_fraction(text: str) -> float:
    """Fraction of characters in non-blank lines that repeat an earlier line of the document."""
    seen: set[str] = set()
    dup = total = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            dup += len(line)
        else:
            seen.add(line)
    return dup / total if total else 0.0


def dup_ngram_fraction(shingles: np.ndarray, unique: np.ndarray | None = None) -> float:
    """Fraction of the word n-grams that repeat an earlier one (`unique`: np.unique(shingles), if known)."""
    if len(shingles) == 0:
        return 0.0
    return 1.0 - len(np.unique(shingles) if unique is None else unique) / len(shingles)


class QualityFilter:
    def __init__(self, min_chars=50, max_line_chars=10000, min_alpha_frac=0.4,
                 max_dup_line_frac=0.3, max_dup_ngram_frac=0.3, blocklist=None):
        self.min_chars = min_chars
        self.max_line_chars = max_line_chars
        self.min_alpha_frac = min_alpha_frac
        self.max_dup_line_frac = max_dup_line_frac
        self.max_dup_ngram_frac = max_dup_ngram_frac
        self.blocklist = load_blocklist(blocklist)

    def reason(self, text: str, shingles: np.ndarray, unique: np.ndarray | None = None) -> str | None:
        """The first rule that rejects `text`, or None to keep it."""
        if len(text) < self.min_chars:
            return "too_short"
        if len(text) > self.max_line_chars and max(map(len, text.split("\n"))) > self.max_line_chars:
            return "line_too_long"
        if alpha_fraction(text) < self.min_alpha_frac:
            return "low_alpha"
        if dup_line_fraction(text) > self.max_dup_line_frac:
            return "repeated_lines"
        if dup_ngram_fraction(shingles, unique) > self.max_dup_ngram_frac:
            return "repeated_ngrams"
        if self.blocklist is not None and self.blocklist.search(text):
            return "blocklist"
        return None
