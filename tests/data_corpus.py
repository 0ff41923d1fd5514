"""Small synthetic corpora for tests: English-like sentences from a fixed word list, seeded.

`write_corpus(folder)` writes .txt/.md/.jsonl files; `make_dataset(tmp)` prepares them into a
dataset folder (about a second with a small vocabulary), for tests of training and evaluation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the a of and to in is was that it he she for on with as his her they at be this from "
    "by had not but what all were when we there can an your which their said if do will each "
    "about how up out them then many some so these would other into has more two like him see "
    "time could no make than first been its who now people my made over did down only way find "
    "use may water long little very after words called just where most know get through back "
    "much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why "
    "things help put years different away again off went old number great tell men say small "
    "every found still between name should home big give air line set own under read last never "
    "us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form "
    "food keep children feet land side without boy once animals life enough took sometimes four "
    "head above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story boys "
    "since white days paper hard near sentence better best across during today others however "
    "sure means knew tree whole king town river queen castle sword ship storm garden winter"
).split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + rng.choice(".!?.")


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 5)))


def document(rng: random.Random, paragraphs: int = 3) -> str:
    return "\n\n".join(paragraph(rng) for _ in range(paragraphs))


def write_corpus(folder: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """`folder` with a few .txt, .md and .jsonl files: n_docs documents in all (small ones, < 2 KB)."""
    rng = random.Random(seed)
    folder = Path(folder)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n_docs // 2):  # one document per small text file
        suffix = ".md" if i % 4 == 0 else ".txt"
        where = folder / "sub" if i % 3 == 0 else folder
        (where / f"doc{i:03d}{suffix}").write_text(document(rng) + "\n", encoding="utf-8")
    with open(folder / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_docs - n_docs // 2):
            if i % 5 == 4:
                rec = {"messages": [{"role": "user", "content": paragraph(rng)},
                                    {"role": "assistant", "content": paragraph(rng)}]}
            else:
                rec = {"text": document(rng, 2)}
            f.write(json.dumps(rec) + "\n")
    return folder


def make_dataset(tmp: Path, n_docs: int = 40, vocab_size: int = 320, seed: int = 0, **settings) -> Path:
    """Write a corpus under tmp/corpus and prepare it into tmp/data; returns the dataset folder."""
    from workbench.engine.data.prepare import prepare

    corpus = write_corpus(Path(tmp) / "corpus", n_docs, seed)
    out = Path(tmp) / "data"
    prepare([corpus], out, {"vocab_size": vocab_size, "val_fraction": 0.2, **settings})
    return out
