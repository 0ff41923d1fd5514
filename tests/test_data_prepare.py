"""`workbench prepare` end to end: report, splits, atomic output, bad input, the command line."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from data_corpus import document, write_corpus

from workbench.engine.data.dataset import Dataset
from workbench.engine.data.prepare import prepare
from workbench.engine.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"vocab_size": 320, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=40)


def test_prepare_writes_the_dataset_and_report(corpus, tmp_path):
    events = []
    report = prepare([corpus], tmp_path / "data", SMALL, progress=events.append)
    out = tmp_path / "data"
    for name in ("tokenizer.model", "tokenizer.json", "token_bytes.npy", "train.bin", "val.bin",
                 "val_docs.npy", "val_docs.jsonl", "report.json", "report.txt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == report
    assert report["input"]["documents"] == 40 and report["kept"]["documents"] == 40
    assert report["splits"]["train"]["documents"] + report["splits"]["val"]["documents"] == 40
    assert report["kept"]["tokens"] == report["splits"]["train"]["tokens"] + report["splits"]["val"]["tokens"]
    assert report["tokenizer"]["bytes_per_token"] > 1
    text = (out / "report.txt").read_text()
    assert "kept" in text and "bytes per token" in text
    ds = Dataset.open(out)
    assert len(ds.train) == report["splits"]["train"]["tokens"]
    assert len(ds.val) == report["splits"]["val"]["tokens"]
    assert (ds.train == ds.tokenizer.bos_id).sum() == report["splits"]["train"]["documents"]
    stages = [e["stage"] for e in events]
    assert stages[0] == "read" and stages[-1] == "done"
    assert {"tokenizer", "encode"} <= set(stages)
    assert all(0 <= e["fraction"] <= 1 for e in events if e["fraction"] is not None)
    assert not list(tmp_path.glob(".data.*"))  # no temporary folder left


def test_val_split_is_by_document_and_deterministic(corpus, tmp_path):
    prepare([corpus], tmp_path / "a", SMALL)
    prepare([corpus], tmp_path / "b", SMALL)
    for name in ("train.bin", "val.bin", "tokenizer.model", "val_docs.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ds = Dataset.open(tmp_path / "a")
    train_text = ds.tokenizer.decode(ds.train)
    for meta in ds.val_sources():
        assert meta["preview"][:80] not in train_text  # no val document leaks into train


def test_val_sources_are_the_val_split(corpus, tmp_path):
    val_file = tmp_path / "held_out.txt"
    val_file.write_text(document(random.Random(99), 4))
    report = prepare([corpus], tmp_path / "data", {**SMALL, "val_sources": [str(val_file)]})
    assert report["splits"]["val"]["documents"] == 1
    assert Dataset.open(tmp_path / "data").val_sources()[0]["source"].startswith(str(val_file))


def test_filters_and_dedup_are_counted(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    docs = [document(rng, 3) for _ in range(12)]
    for i, d in enumerate(docs):
        (src / f"d{i}.txt").write_text(d)
    (src / "copy.txt").write_text(docs[0])  # exact duplicate
    (src / "copy_ws.txt").write_text("  " + docs[1].replace("\n\n", "\n\n\n\n") + "  \n")  # same after cleaning
    words = docs[2].split(" ")
    words[10] = "CHANGED"
    (src / "near.txt").write_text(" ".join(words))  # near duplicate
    (src / "short.txt").write_text("Too short.")
    (src / "symbols.txt").write_text("{}[]<>=+-*/|#@$%^&~0123456789 " * 20)
    (src / "spam.txt").write_text(docs[3][:200] + "\n" + "\n".join(["Buy cheap pills at our store now!!"] * 30))
    (src / "blocked.txt").write_text(document(rng, 2) + " The secret codeword appears here.")
    (src / "binary.txt").write_bytes(b"\x00\x01\x02" * 50)
    (src / "latin1.txt").write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    (src / "bad.jsonl").write_text(json.dumps({"text": document(rng, 2)}) + '\n{broken\n{"no": "text"}\n')
    block = tmp_path / "block.txt"
    block.write_text("codeword\n")
    report = prepare([src], tmp_path / "data", {**SMALL, "blocklist": str(block)})
    dropped = {k: v["documents"] for k, v in report["dropped"].items()}
    assert dropped == {"exact_duplicate": 2, "too_short": 1, "line_too_long": 0, "low_alpha": 1,
                       "repeated_lines": 1, "repeated_ngrams": 0, "blocklist": 1, "near_duplicate": 1}
    assert report["kept"]["documents"] == 13  # 12 + the JSONL record
    assert report["input"]["files_skipped_binary"] == 1
    assert report["input"]["files_skipped_not_utf8"] == 1
    assert report["input"]["jsonl_malformed_lines"] == 2
    total = report["kept"]["bytes"] + sum(v["bytes"] for v in report["dropped"].values())
    assert total == report["input"]["bytes"]
    assert all(v["tokens_est"] >= 0 for v in report["dropped"].values())
    text = (tmp_path / "data" / "report.txt").read_text()
    assert "dropped: near_duplicate" in text and "JSONL lines malformed" in text


def test_no_near_dedup_keeps_near_duplicates(tmp_path):
    rng = random.Random(6)
    a = document(rng, 4)
    words = a.split(" ")
    words[5] = "CHANGED"
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_text(" ".join(words))
    (tmp_path / "c.txt").write_text(document(rng, 4))
    on = prepare([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"], tmp_path / "on", SMALL)
    off = prepare([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"], tmp_path / "off",
                  {**SMALL, "near_dedup": False})
    assert on["dropped"]["near_duplicate"]["documents"] == 1
    assert off["dropped"]["near_duplicate"]["documents"] == 0 and off["kept"]["documents"] == 3


def test_refuses_to_overwrite_unless_forced_and_failure_keeps_old(corpus, tmp_path):
    out = tmp_path / "data"
    prepare([corpus], out, SMALL)
    before = (out / "train.bin").read_bytes()
    with pytest.raises(DataError, match="not empty .*--force"):
        prepare([corpus], out, SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tiny.txt").write_text("hi")
    with pytest.raises(DataError, match="left after filtering"):
        prepare([empty], out, {**SMALL, "force": True})
    assert (out / "train.bin").read_bytes() == before  # the failed run changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]  # and left no temp folder
    prepare([corpus], out, {**SMALL, "force": True, "vocab_size": 330})
    assert Dataset.open(out).tokenizer.vocab_size == 330


def test_stale_partial_folder_of_a_killed_run_is_cleared(corpus, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".data.partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"half")
    prepare([corpus], tmp_path / "data", SMALL)
    assert not stale.exists()


def test_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match="source not found"):
        prepare([tmp_path / "missing"], tmp_path / "out", SMALL)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no text found"):
        prepare([tmp_path / "empty_dir"], tmp_path / "out", SMALL)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="no text found .*files_skipped_binary=1"):
        prepare([tmp_path / "bin"], tmp_path / "out", SMALL)
    with pytest.raises(DataError, match="val-fraction"):
        prepare([tmp_path / "bin"], tmp_path / "out", {"val_fraction": 0.9})
    with pytest.raises(DataError, match="unknown prepare setting"):
        prepare([tmp_path / "bin"], tmp_path / "out", {"vocab": 300})
    # One document and nothing dropped: no empty "()" where the reasons would be.
    (tmp_path / "one.txt").write_text("A single short document about rivers, kings and the long winter "
                                      "that came over the valley when the old mill stopped turning.")
    with pytest.raises(DataError, match=r"^1 of 1 documents left after filtering and dedup; at least 2 are needed"):
        prepare([tmp_path / "one.txt"], tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()


def test_builtin_corpus_prepares(tmp_path):
    report = prepare(None, tmp_path / "data", {"vocab_size": 400, "tokenizer_sample_mb": 0.5})
    assert report["sources"] == []
    assert report["kept"]["bytes"] > 1_000_000  # Python's documentation: real English, no download
    assert report["tokenizer"]["sample_bytes"] < 700_000
    assert Dataset.open(tmp_path / "data").val_docs.shape[0] >= 1


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "workbench.engine", "prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_prepare_and_clear_errors(corpus, tmp_path):
    done = _cli("--source", corpus, "--out", tmp_path / "data", "--vocab-size", 320, "--val-fraction", 0.2,
                "--tokenizer", "unigram", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bytes per token" in done.stdout
    assert Dataset.open(tmp_path / "data").meta["model_type"] == "unigram"
    again = _cli("--source", corpus, "--out", tmp_path / "data", cwd=tmp_path)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "--force" in again.stderr
    missing = _cli("--source", tmp_path / "nope", "--out", tmp_path / "x", cwd=tmp_path)
    assert missing.returncode != 0 and missing.stderr.strip() == f"error: source not found: {tmp_path / 'nope'}"


def test_worker_processes_give_the_same_dataset(corpus, tmp_path):
    one = prepare([corpus], tmp_path / "one", {**SMALL, "workers": 1})
    two = prepare([corpus], tmp_path / "two", {**SMALL, "workers": 2})
    assert one["dropped"] == two["dropped"] and one["splits"] == two["splits"]
    for name in ("train.bin", "val.bin", "val_docs.npy", "tokenizer.model"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_kill_9_mid_prepare_leaves_the_old_dataset_whole(tmp_path):
    out = tmp_path / "data"
    small = write_corpus(tmp_path / "small", n_docs=20, seed=1)
    prepare([small], out, SMALL)
    old = (out / "train.bin").read_bytes()
    big = write_corpus(tmp_path / "big", n_docs=3000, seed=2)  # a few seconds of work
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "workbench.engine", "prepare", "--source", str(big),
                              "--out", str(out),
                              "--force", "--vocab-size", "320", "--quiet", "--progress-json"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    first = json.loads(child.stdout.readline())  # it is under way
    assert first["stage"] == "read"
    child.kill()
    child.wait()
    assert (out / "train.bin").read_bytes() == old  # the old dataset is untouched
    Dataset.open(out)
    prepare([small], out, {**SMALL, "force": True})  # the next run clears the half-written folder
    assert not list(tmp_path.glob(".data.partial-*"))


def test_tokenizer_from_reuses_an_existing_tokenizer(corpus, tmp_path):
    prepare([corpus], tmp_path / "first", SMALL)
    other = write_corpus(tmp_path / "other", n_docs=20, seed=3)
    report = prepare([other], tmp_path / "second", {**SMALL, "tokenizer_from": str(tmp_path / "first")})
    first, second = Dataset.open(tmp_path / "first"), Dataset.open(tmp_path / "second")
    assert second.tokenizer.sha256 == first.tokenizer.sha256
    assert report["tokenizer"]["sample_bytes"] == 0
    with pytest.raises(DataError, match="tokenizer not found"):
        prepare([other], tmp_path / "third", {**SMALL, "tokenizer_from": str(tmp_path / "nope")})
    assert not (tmp_path / "third").exists()
