"""Cleaning, quality filters and dedup, each on text made to trip exactly one rule."""

import random

import numpy as np
import pytest
from data_corpus import document

from workbench.engine.data.clean import clean_text
from workbench.engine.data.dedup import NearDedup, digest, shingle_hashes
from workbench.engine.data.filters import QualityFilter, alpha_fraction, dup_line_fraction
from workbench.engine.errors import DataError

GOOD = document(random.Random(0))


def reason(text, **kw):
    return QualityFilter(**kw).reason(text, shingle_hashes(text))


def test_clean_nfkc_controls_and_whitespace():
    assert clean_text("ﬁne ｆｕｌｌｗｉｄｔｈ café") == "fine fullwidth café"  # NFKC
    assert clean_text("a\u00a0b") == "a b"  # no-break space
    assert clean_text("bell\x07 null\x00 esc\x1b del\x7f zw\u200bsp\ufeff") == "bell null esc del zwsp"
    assert clean_text("keep\ttabs\nand lines") == "keep\ttabs\nand lines"
    assert clean_text("windows\r\nold mac\rend") == "windows\nold mac\nend"
    assert clean_text("trailing   \nspaces\t\n\n\n\n\nmany blank lines") == "trailing\nspaces\n\nmany blank lines"
    assert clean_text("  \n\n  padded  \n\n") == "padded"
    family = "👨\u200d👩\u200d👧"
    assert clean_text(family) == family  # zero-width joiners hold emoji together


def test_good_text_passes_every_filter():
    assert reason(GOOD) is None


def test_too_short():
    assert reason("Too short.", min_chars=50) == "too_short"
    assert reason("Too short.", min_chars=5) is None


def test_line_too_long():
    text = GOOD + "\n" + "x" * 300
    assert reason(text, max_line_chars=200) == "line_too_long"
    assert reason(text, max_line_chars=400) is None


def test_symbol_alpha_ratio():
    symbols = GOOD[:100] + " " + "{}[]<>=+-*/|\\#@$%^&~0123456789" * 20
    assert alpha_fraction(symbols) < 0.4
    assert reason(symbols) == "low_alpha"
    assert alpha_fraction("ab 12") == 0.5
    assert alpha_fraction("été 12") == pytest.approx(3 / 5)  # non-ASCII path agrees


def test_repeated_lines():
    text = GOOD + "\n" + "\n".join(["Subscribe to our newsletter for more great content today!"] * 20)
    assert dup_line_fraction(text) > 0.3
    assert reason(text) == "repeated_lines"
    # short repeated lines (speaker names) weigh by their characters, so a play passes
    play = "\n".join(f"ROMEO:\n{s}" for s in GOOD.split(". "))
    assert reason(play) is None


def test_repeated_ngrams():
    rng = random.Random(3)
    chant = " ".join(["we will rock you all night long"] * 30)
    text = chant + " " + document(rng, 1)
    assert reason(text) == "repeated_ngrams"
    assert reason(text, max_dup_ngram_frac=0.99) is None


def test_blocklist(tmp_path):
    block = tmp_path / "block.txt"
    block.write_text("# comment\nForbidden Phrase\nbadword\n")
    assert reason(GOOD + " A forbidden   phrase? no.", blocklist=block) is None  # whitespace differs
    assert reason(GOOD + " This has a FORBIDDEN PHRASE in it.", blocklist=block) == "blocklist"
    assert reason(GOOD + " badword.", blocklist=block) == "blocklist"
    assert reason(GOOD + " badwords are fine.", blocklist=block) is None  # whole words only
    with pytest.raises(DataError, match="blocklist file not found"):
        QualityFilter(blocklist=tmp_path / "missing.txt")


def test_exact_digest():
    assert digest("same text") == digest("same text") != digest("same text.")


def test_near_dedup_catches_small_edits_not_different_text():
    rng = random.Random(7)
    original = document(rng, 4)
    words = original.split(" ")
    edited = " ".join("CHANGED" if i == len(words) // 2 else w for i, w in enumerate(words))
    other = document(rng, 4)
    near = NearDedup(threshold=0.8)
    assert not near.is_duplicate(np.unique(shingle_hashes(original)))
    assert near.is_duplicate(np.unique(shingle_hashes(edited)))
    assert not near.is_duplicate(np.unique(shingle_hashes(other)))
    assert not near.is_duplicate(np.unique(shingle_hashes("too few words")))  # nothing to compare


def test_shingles_are_reproducible():
    a = shingle_hashes("one two three four five six seven")
    assert len(a) == 3
    assert (a == shingle_hashes("one two three four five six seven")).all()
