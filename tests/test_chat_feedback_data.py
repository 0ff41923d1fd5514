"""Conversations are data: a run's conversations.jsonl through `workbench prepare` (corrections in, bad replies out)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from engine_helpers import cli_env

from workbench.engine import conversations as log
from workbench.engine.data.dataset import Dataset

SETTINGS = {"temperature": 0.8, "top_p": 1.0, "max_tokens": 64}


def _say(run: Path, conv_id: str, messages: list[dict]) -> None:
    log.record_conversation(run, conv_id, messages, source="cli", checkpoint="step_000020", settings=SETTINGS,
                            finish="stop")


def _turns(*pairs) -> list[dict]:
    out = []
    for user, assistant in pairs:
        out.append({"role": "user", "content": user})
        if assistant is not None:
            out.append({"role": "assistant", "content": assistant})
    return out


def write_log(run: Path) -> Path:
    """Five conversations: good, corrected, rated bad, cut at a bad second reply, never answered; a torn line."""
    run.mkdir(parents=True)
    _say(run, "c-good", _turns(("what is a list", None)))  # an earlier state: the latest one counts
    _say(run, "c-good", _turns(("what is a list", "a list holds items in order")))
    log.record_feedback(run, "c-good", 1, rating="good")
    _say(run, "c-fixed", _turns(("what is a tuple", "original wrong tuple answer")))
    log.record_feedback(run, "c-fixed", 1, rating="bad")
    log.record_feedback(run, "c-fixed", 1, correction="a tuple is a fixed sequence")
    _say(run, "c-bad", _turns(("what is a dict", "terrible dict answer")))
    log.record_feedback(run, "c-bad", 1, rating="bad")
    _say(run, "c-cut", _turns(("what is a set", "a set holds unique items"),
                              ("and a frozen set", "awful frozen reply")))
    log.record_feedback(run, "c-cut", 3, rating="bad")
    _say(run, "c-none", _turns(("is anyone there", None)))
    path = log.path_of(run)
    with open(path, "ab") as f:  # cut by a crash: it would rate the good reply bad, but it never finished
        f.write(b'{"schema":1,"type":"feedback","id":"c-good","index":1,"rating":"ba')
    return path


def test_training_records_count_what_the_log_gives(tmp_path):
    skipped: dict = {}
    records = {r["id"]: r for r in log.training_records(write_log(tmp_path / "run"), skipped)}
    assert {k: r["left_out"] for k, r in records.items()} == {"c-good": None, "c-fixed": None, "c-bad": "rated_bad",
                                                              "c-cut": None, "c-none": "no_reply"}
    assert records["c-fixed"]["corrected"] == 1 and records["c-fixed"]["messages"][1]["content"].startswith("a tuple")
    assert records["c-cut"]["cut_at_bad"] and len(records["c-cut"]["messages"]) == 2
    assert skipped == {"torn_last_line": 1}
    assert [m for m in log.training_conversations(log.path_of(tmp_path / "run"))] == [
        records[k]["messages"] for k in ("c-good", "c-fixed", "c-cut")]


def test_prepare_reads_a_conversation_log_with_its_feedback(tiny_data, tmp_path):
    source = write_log(tmp_path / "runs" / "chat")
    out = tmp_path / "data" / "fb"
    done = subprocess.run([sys.executable, "-m", "workbench.engine", "prepare", "--source", str(source),
                           "--tokenizer-from", str(tiny_data), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rated_bad" in done.stdout and "no_reply" in done.stdout  # the dropped reasons, in the printed report

    ds = Dataset.open(out)
    convs = [c for split in ("train", "val") for c in ds.conversations(split)]
    texts = [ds.tokenizer.decode(ids) for ids, _ in convs]
    trained = [ds.tokenizer.decode(ids[mask.astype(bool)]) for ids, mask in convs]
    assert len(convs) == 3
    joined, joined_trained = " ".join(texts), " ".join(trained)
    for reply in ("a list holds items in order", "a tuple is a fixed sequence", "a set holds unique items"):
        assert reply in joined_trained
    for gone in ("original wrong", "terrible dict", "what is a dict", "awful frozen", "and a frozen set",
                 "is anyone there"):
        assert gone not in joined
    assert all(np.asarray(mask).any() for _, mask in convs)

    report = json.loads((out / "report.json").read_text())
    assert report["chat"]["conversation_log"] == {
        "conversations": 5, "used": 3, "replies_corrected": 1, "cut_at_bad_reply": 1,
        "left_out": {"rated_bad": 1, "no_reply": 1}, "skipped_lines": {"torn_last_line": 1}}
    assert report["chat"]["dropped"] == {"rated_bad": 1, "no_reply": 1}
    assert report["input"]["documents"] == 5 and report["kept"]["documents"] == 3
    assert not any(k.startswith("conversation_log") for k in report["input"])
