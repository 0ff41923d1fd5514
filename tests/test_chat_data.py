"""Chat data through `workbench prepare`: records, bad input per reason, packing, masks, splits, built-in chat."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
from data_corpus import paragraph, sentence
from engine_helpers import cli_env, tiny_raw, write_toml

from workbench.engine.chat import ChatTemplate, check_messages, render_text
from workbench.engine.data.builtin_chat import MAX_ANSWER_CHARS, MAX_SIGNATURE_CHARS, builtin_conversations
from workbench.engine.data.dataset import Dataset
from workbench.engine.data.prepare import best_fit_rows, prepare
from workbench.engine.errors import DataError

SEQ = 256


def conversation(rng: random.Random, i: int) -> dict:
    """A valid record: `messages` (sometimes with a system message, sometimes two turns) or prompt/completion."""
    q, a = f"Question {i}: {sentence(rng)[:40].strip()}", f"Answer {i}: {paragraph(rng)[:60].strip()}"
    if i % 4 == 3:
        return {"prompt": q, "completion": a}
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 4 == 1:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    if i % 4 == 2:
        messages += [{"role": "user", "content": f"And {i}?"}, {"role": "assistant", "content": f"Also {i}."}]
    return {"messages": messages}


BAD = {  # one malformed record per reason the report counts
    "not_json": "{broken",
    "not_a_conversation": json.dumps({"text": "plain text in a chat file"}),
    "not_a_list": json.dumps({"messages": "hello"}),
    "not_a_message": json.dumps({"messages": [["user", "hi"], {"role": "assistant", "content": "x"}]}),
    "unknown_role": json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                             {"role": "assistant", "content": "x"}]}),
    "content_not_text": json.dumps({"messages": [{"role": "user", "content": 3},
                                                 {"role": "assistant", "content": "x"}]}),
    "empty_content": json.dumps({"messages": [{"role": "user", "content": " \u200b "},
                                              {"role": "assistant", "content": "x"}]}),
    "system_not_first": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "system", "content": "late"},
                                                 {"role": "assistant", "content": "x"}]}),
    "out_of_order": json.dumps({"messages": [{"role": "assistant", "content": "hello"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "x"}]}),
    "last_not_assistant": json.dumps({"messages": [{"role": "user", "content": "unanswered"}]}),
}


def write_chats(path: Path, n: int = 60, seed: int = 0, extra: list[str] = ()) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps(conversation(rng, i)) for i in range(n)]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_source(tmp_path_factory) -> Path:
    """60 valid conversations, one exact duplicate, one too long (cut), one cut to nothing, one bad per reason."""
    folder = tmp_path_factory.mktemp("chats")
    rng = random.Random(1)
    long_answer = {"messages": [{"role": "user", "content": "Tell me everything."},
                                {"role": "assistant", "content": " ".join(paragraph(rng) for _ in range(8))}]}
    long_question = {"messages": [{"role": "user", "content": " ".join(paragraph(rng) for _ in range(8))},
                                  {"role": "assistant", "content": "No."}]}
    first = json.dumps(conversation(random.Random(0), 0))
    return write_chats(folder / "chats.jsonl", extra=[first, json.dumps(long_answer), json.dumps(long_question),
                                                      *BAD.values()])


@pytest.fixture(scope="module")
def chat_data(chat_source, tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chat_out") / "data"
    report = prepare([chat_source], out, {"tokenizer_from": str(tiny_data), "seq_len": SEQ, "val_fraction": 0.2})
    return out, report


def test_records_become_a_chat_dataset_and_bad_input_is_counted_per_reason(chat_data):
    out, report = chat_data
    chat = report["chat"]
    assert chat["dropped"] == {**{reason: 1 for reason in BAD}, "exact_duplicate": 1, "truncated_to_nothing": 1}
    assert set(chat["reasons"]) == set(chat["dropped"])
    assert report["input"]["documents"] == 60 + 3 + len(BAD)
    kept = chat["conversations"]["train"] + chat["conversations"]["val"]
    assert kept == report["kept"]["documents"] == 60 + 1  # the long answer is kept, cut to a row
    per = chat["per_split"]
    assert per["train"]["truncated"] + per["val"]["truncated"] == 2  # the long answer and the long question
    assert sum(per[s]["assistant_turns"] for s in per) == 60 + 15 + 1  # 15 two-turn conversations
    assert sum(per[s]["system_turns"] for s in per) == 15
    assert sum(per[s]["multi_turn"] for s in per) == 15
    text = (out / "report.txt").read_text()
    assert "chat: template workbench-chat-v1, rows of 257 tokens (seq_len 256, from --seq-len)" in text
    assert "unknown_role" in text and "a role other than system, user or assistant" in text
    meta = json.loads((out / "chat.json").read_text())
    assert meta["seq_len"] == SEQ and meta["row_tokens"] == SEQ + 1 and meta["template"] == "workbench-chat-v1"


def test_rows_start_with_bos_padding_is_masked_and_masks_cover_assistant_text(chat_data, chat_source):
    out, report = chat_data
    ds = Dataset.open(out)
    t = ChatTemplate(ds.tokenizer)
    assert ds.chat is not None and ds.seq_len == SEQ
    for split in ("train", "val"):
        tokens, mask = ds.rows(split)
        assert tokens.shape == (ds.chat["rows"][split], SEQ + 1) == mask.shape
        assert (tokens[:, 0] == t.bos_id).all()
        assert not mask[tokens == t.pad_id].any()  # padding never trained
        assert report["chat"]["per_split"][split]["trained_tokens"] == int(mask.sum())
        assert report["chat"]["per_split"][split]["padding_tokens"] == int((tokens == t.pad_id).sum())
    # Every packed conversation, its trained tokens decoded, is its assistant messages each with <|end|>.
    records = {}
    for line in chat_source.read_text().splitlines():
        try:
            msgs = check_messages(json.loads(line).get("messages") or [
                {"role": "user", "content": json.loads(line)["prompt"]},
                {"role": "assistant", "content": json.loads(line)["completion"]}])
        except Exception:
            continue
        records[render_text(msgs)] = msgs
    seen = 0
    for split in ("train", "val"):
        for ids, mask in ds.conversations(split):
            text = t._text(ids)
            if len(ids) == SEQ + 1:
                continue  # the one truncated conversation
            msgs = records[text.removeprefix("<|bos|>")]
            expected = "".join(m["content"] + "<|end|>" for m in msgs if m["role"] == "assistant")
            assert ds.tokenizer.decode(ids[mask == 1]) == expected
            seen += 1
    assert seen == report["kept"]["documents"] - 1


def test_packing_is_best_fit_and_deterministic():
    rows = best_fit_rows([6, 5, 4, 3, 2, 1], 7)
    assert rows == [[0, 5], [1, 4], [2, 3]]  # longest first, each into the fullest row it fits
    rng = random.Random(3)
    lengths = [rng.randint(5, 60) for _ in range(500)]
    rows = best_fit_rows(lengths, 65)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 65 for row in rows)
    assert rows == best_fit_rows(lengths, 65)
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    assert len(rows) <= 1.05 * sum(lengths) / 65 + 1  # close to no padding at all


def test_val_split_is_held_out_by_conversation_and_deterministic(chat_data, chat_source, tiny_data, tmp_path):
    out, report = chat_data
    ds = Dataset.open(out)
    t = ChatTemplate(ds.tokenizer)
    train = {t._text(ids) for ids, _ in ds.conversations("train")}
    val = [t._text(ids) for ids, _ in ds.conversations("val")]
    assert val and not train & set(val)
    # val_docs point at each val conversation: its <|bos|>, its length, its bytes
    assert len(ds.val_docs) == len(val) == report["chat"]["conversations"]["val"] == len(ds.val_sources())
    for (start, count, nbytes), text in zip(ds.val_docs, val, strict=True):
        assert ds.val[start] == t.bos_id and t._text(ds.val[start:start + count]) == text
        assert ds.token_bytes[ds.val[start:start + count]].sum() == nbytes
    again = prepare([chat_source], tmp_path / "again", {"tokenizer_from": str(tiny_data), "seq_len": SEQ,
                                                        "val_fraction": 0.2})
    assert again["chat"] == report["chat"]
    for name in ("train.bin", "train_mask.bin", "val.bin", "val_mask.bin", "val_docs.npy", "chat.json"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_val_source_chat_file_is_the_val_split(tiny_data, tmp_path):
    train = write_chats(tmp_path / "train.jsonl", n=30)
    held = write_chats(tmp_path / "held.jsonl", n=5, seed=9)
    report = prepare([train], tmp_path / "out", {"tokenizer_from": str(tiny_data), "seq_len": SEQ,
                                                 "val_sources": [str(held)]})
    assert report["chat"]["conversations"] == {"train": 30, "val": 5}
    assert all(s["source"].startswith(str(held)) for s in Dataset.open(tmp_path / "out").val_sources())


def test_seq_len_comes_from_the_base_run_and_is_checked(chat_source, tiny_data, tmp_path):
    run = tmp_path / "runs" / "base"
    run.mkdir(parents=True)
    (run / "tokenizer.model").write_bytes((tiny_data / "tokenizer.model").read_bytes())
    write_toml(run / "config.toml", tiny_raw(tiny_data, model={"seq_len": 200}))
    prepare([chat_source], tmp_path / "out", {"tokenizer_from": str(run)})
    ds = Dataset.open(tmp_path / "out")
    assert ds.seq_len == 200 and ds.chat["seq_len_from"] == str(run / "config.toml")
    ds.check_seq_len(200)
    ds.check_seq_len(512)
    with pytest.raises(DataError, match=r"packed for seq_len 200 but model.seq_len is 128: .*--seq-len 128"):
        ds.check_seq_len(128)
    plain = Dataset.open(tiny_data)
    assert plain.chat is None and plain.seq_len is None and plain.train_mask is None
    plain.check_seq_len(8)


def test_chat_and_plain_text_do_not_mix_unless_flattened(chat_source, tiny_data, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Some plain text about rivers and kings. " * 5)
    settings = {"tokenizer_from": str(tiny_data)}
    with pytest.raises(DataError, match=r"^the sources mix chat \(.*chats.jsonl\) and plain text \(.*notes.txt\).*"
                                        r"--flatten-chat"):
        prepare([chat_source, notes], tmp_path / "out", settings)
    report = prepare([chat_source, notes], tmp_path / "out", {**settings, "flatten_chat": True, "val_fraction": 0.2})
    assert "chat" not in report and not (tmp_path / "out" / "chat.json").exists()
    ds = Dataset.open(tmp_path / "out")
    assert ds.chat is None and ds.tokenizer.special_ids["<|assistant|>"] in ds.train  # flattened, every token


def test_a_file_without_one_valid_conversation_is_a_one_line_error(tiny_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([BAD["unknown_role"], BAD["unknown_role"], BAD["out_of_order"]]) + "\n")
    with pytest.raises(DataError, match=r"^no valid conversation in .*bad.jsonl \(out_of_order=1, unknown_role=2\)"):
        prepare([bad], tmp_path / "out", {"tokenizer_from": str(tiny_data)})
    assert not (tmp_path / "out").exists()
    done = _cli("--source", bad, "--out", tmp_path / "out", "--tokenizer-from", tiny_data, "--quiet", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: no valid conversation in")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "workbench.engine", "prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=120)


def test_cli_prepares_chat_and_shows_two_conversations_in_brackets(chat_source, tiny_data, tmp_path):
    done = _cli("--source", chat_source, "--out", tmp_path / "data", "--tokenizer-from", tiny_data,
                "--seq-len", SEQ, "--show", 2, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "chat: template workbench-chat-v1" in out and "tokens trained (assistant)" in out
    assert out.count("--- conversation ") == 2 and "trained tokens [[in brackets]]" in out
    shown = out.split("--- conversation 1", 1)[1]
    assert shown.count("<|bos|>") == 2 and "<|assistant|>[[" in shown and "<|end|>]]" in shown
    assert "\x1b[" not in out  # not a terminal: no colour
    assert Dataset.open(tmp_path / "data").chat["seq_len"] == SEQ


def test_a_tokenizer_without_chat_tokens_is_a_one_line_error(chat_source, tmp_path):
    model = tmp_path / "plain.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter([sentence(random.Random(i)) for i in range(300)]),
                                       model_writer=f, vocab_size=100, minloglevel=2)
    done = _cli("--source", chat_source, "--out", tmp_path / "out", "--tokenizer-from", model, cwd=tmp_path)
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {model}: tokenizer.model lacks the workbench special and chat tokens")


# --- the built-in chat data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin():
    return builtin_conversations()


def _fingerprint(records) -> str:
    return hashlib.sha256(json.dumps([(r.source, r.messages, r.group) for r in records]).encode()).hexdigest()


def test_builtin_chat_is_thousands_of_valid_distinct_conversations(builtin, tiny_data):
    assert len(builtin) >= 5000
    assert len({render_text(r.messages) for r in builtin}) == len(builtin)  # deduplicated
    assert len({r.source for r in builtin}) == len(builtin)
    for r in builtin:
        assert check_messages(r.messages) == r.messages  # all valid under the template
        for m in r.messages:
            if m["role"] == "assistant":
                assert len(m["content"]) <= MAX_ANSWER_CHARS + MAX_SIGNATURE_CHARS + 60
    shapes = Counter(len([m for m in r.messages if m["role"] == "user"]) for r in builtin)
    assert shapes[2] >= 300  # some multi-turn: a follow-up about another function of the same module
    assert sum(r.messages[0]["role"] == "system" for r in builtin) >= 300
    # Each answer belongs to one group (module or topic), so a val group's answers are never trained on.
    groups: dict[str, set] = {}
    for r in builtin:
        for m in r.messages[1:]:
            if m["role"] == "assistant":
                groups.setdefault(m["content"], set()).add(r.group)
    assert all(len(g) == 1 for g in groups.values())
    users = " ".join(m["content"] for r in builtin for m in r.messages if m["role"] == "user")
    for subject in ("os.path.join", "str.split", "json.dumps", "keyword", "\"assert\" statement"):
        assert subject in users, subject
    ChatTemplate(Dataset.open(tiny_data).tokenizer).render_many([r.messages for r in builtin[:500]])


def test_builtin_chat_is_deterministic_whatever_the_process_did(builtin, monkeypatch):
    code = ("import hashlib, json; from workbench.engine.data.builtin_chat import builtin_conversations as b; "
            "print(hashlib.sha256(json.dumps([(r.source, r.messages, r.group) for r in b()]).encode()).hexdigest())")
    env = {**cli_env(), "PYTHONHASHSEED": "123"}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == _fingerprint(builtin)
    # A host that patched the standard library (as torch.package patches inspect.getfile) gets the same data.
    import inspect

    monkeypatch.setattr(inspect, "getfile", lambda obj: "patched")
    assert _fingerprint(builtin_conversations()) == _fingerprint(builtin)


def test_builtin_chat_prepares_with_val_held_out_by_module(tiny_data, tmp_path):
    report = prepare(None, tmp_path / "chat", {"builtin_chat": True, "tokenizer_from": str(tiny_data)})
    assert report["sources"] == ["builtin-chat"] and report["kept"]["documents"] >= 5000
    chat = report["chat"]
    assert chat["seq_len"] == 128 and chat["seq_len_from"] == "default"
    assert 0.02 < chat["conversations"]["val"] / report["kept"]["documents"] < 0.1
    ds = Dataset.open(tmp_path / "chat")
    answers = {}
    for split in ("train", "val"):
        answers[split] = {ds.tokenizer.decode(ids[mask == 1]) for ids, mask in ds.conversations(split)}
    assert not answers["train"] & answers["val"]  # no val answer was trained on, under any phrasing
    assert os.path.getsize(tmp_path / "chat" / "train_mask.bin") - 64 == len(ds.train)


@pytest.fixture
def chat_copy(chat_data, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(chat_data[0], dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "val_mask.bin").unlink(), "incomplete: missing val_mask.bin"),
    (lambda d: (d / "train_mask.bin").write_bytes((d / "train_mask.bin").read_bytes()[:-1]), "truncated or corrupt"),
    (lambda d: (d / "chat.json").write_text(json.dumps({**json.loads((d / "chat.json").read_text()),
                                                        "template": "other-v9"})), "chat template 'other-v9'"),
    (lambda d: (d / "chat.json").write_text(json.dumps({**json.loads((d / "chat.json").read_text()),
                                                        "rows": {"train": 1, "val": 1}})), "is not 1 rows of"),
])
def test_a_damaged_chat_dataset_is_refused_in_one_line(chat_copy, damage, message):
    damage(chat_copy)
    with pytest.raises(DataError, match=message):
        Dataset.open(chat_copy)


def test_chat_settings_are_checked(tiny_data, tmp_path):
    with pytest.raises(DataError, match="--seq-len must be at least 16"):
        prepare(None, tmp_path / "out", {"builtin_chat": True, "seq_len": 8})
    with pytest.raises(DataError, match="cannot be combined with --flatten-chat"):
        prepare(None, tmp_path / "out", {"builtin_chat": True, "flatten_chat": True})
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(DataError, match="--builtin-chat makes chat data but the sources are plain text"):
        prepare([tmp_path / "notes.txt"], tmp_path / "out", {"builtin_chat": True})
    with pytest.raises(DataError, match="plain-text data: it has no rows"):
        Dataset.open(tiny_data).rows("train")
