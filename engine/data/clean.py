"""Text normalisation applied to every document before filtering and hashing.

NFKC folds compatibility characters (full-width letters, ligatures, non-breaking
spaces) into their plain forms; control characters other than newline and tab are
removed, as are zero-width spaces, byte-order marks and soft hyphens (invisible, and
they break exact dedup); line endings become "\\n", trailing spaces go, runs of blank
lines collapse to one, and the document is stripped. Zero-width joiners stay: emoji
sequences need them.
"""

from __future__ import annotations

import re
import unicodedata

_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\u00ad]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()
