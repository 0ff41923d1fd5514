"""Shared fixtures: small prepared datasets, made once per test session from real English text.

The text is the first ~300 KB of the built-in corpus (Python's own documentation), cut
into ~1 KB documents and prepared with a tiny vocabulary, so training tests run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _prepare_builtin_slice(folder: Path, vocab_size: int, max_chars: int = 300_000, skip_docs: int = 0) -> Path:
    from workbench.engine.data.builtin import builtin_documents
    from workbench.engine.data.prepare import prepare

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    total = 0
    with open(corpus, "w", encoding="utf-8") as f:
        for i, (_, text) in enumerate(builtin_documents(1000)):
            if i < skip_docs:
                continue
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_chars:
                break
    out = folder / "dataset"
    prepare([corpus], out, {"vocab_size": vocab_size, "val_fraction": 0.2, "doc_chars": 1000, "threads": 2})
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset folder: vocab 400, ~145k train / ~37k val tokens, ~50 val documents."""
    return _prepare_builtin_slice(tmp_path_factory.mktemp("tiny_data"), vocab_size=400)


@pytest.fixture(scope="session")
def other_tokenizer_data(tmp_path_factory) -> Path:
    """Same kind of data as tiny_data, but prepared with a different tokenizer (vocab 400, other text)."""
    return _prepare_builtin_slice(tmp_path_factory.mktemp("other_data"), vocab_size=400, skip_docs=400)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 20-step run of the tiny test model (checkpoints at steps 10 and 20). Copy it before changing it."""
    from engine_helpers import tiny_config

    from workbench.engine.run_setup import create_run
    from workbench.engine.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    assert train(create_run(run, tiny_config(tiny_data)), echo=None) == "finished"
    return run


@pytest.fixture
def torch_single_thread():
    """One torch thread for the test (tiny models gain nothing from more, and CI has two busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
