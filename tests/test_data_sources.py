"""Reading sources: text files cut at paragraphs, folders, JSONL text and chat, bad files counted."""

import json
from collections import Counter

import pytest

from workbench.engine.data.builtin import builtin_documents
from workbench.engine.data.sources import check_sources, read_documents, split_documents
from workbench.engine.errors import DataError


def read(paths, doc_chars=8000):
    stats = Counter()
    docs = list(read_documents(check_sources(paths), stats, doc_chars))
    return docs, stats


def test_small_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    docs, stats = read([tmp_path / "a.txt"])
    assert docs == [(f"{tmp_path / 'a.txt'}:1", "First paragraph.\n\nSecond paragraph.\n")]
    assert stats["files_read"] == 1


def test_big_text_file_is_cut_at_paragraph_boundaries(tmp_path):
    paragraphs = [f"Paragraph {i} " + "word " * 30 + "\n" for i in range(40)]
    (tmp_path / "big.txt").write_text("\n".join(paragraphs))
    docs, _ = read([tmp_path / "big.txt"], doc_chars=500)
    assert len(docs) > 5
    assert "".join(text for _, text in docs) == "\n".join(paragraphs)  # nothing lost or duplicated
    for _, text in docs[:-1]:
        assert text.endswith("\n\n")  # every cut is at a blank line
        assert 500 <= len(text) < 1000
    # source names the first line of each document
    first_lines = [int(src.rsplit(":", 1)[1]) for src, _ in docs]
    lines = "\n".join(paragraphs).split("\n")
    for (_src, text), line_no in zip(docs, first_lines, strict=True):
        assert lines[line_no - 1] == text.split("\n")[0]


def test_cut_rules_keep_documents_bounded():
    blocks = ["x" * 1000] * 50 + ["end\n"]  # one endless line, read in blocks
    docs = list(split_documents(blocks, 100))
    assert max(len(t) for _, t in docs) == 400  # cut mid-line at 4x
    assert "".join(t for _, t in docs) == "".join(blocks)
    lines = "".join(f"line {i:04d} of a paragraph that never ends\n" for i in range(100))
    docs = list(split_documents([lines], 300))
    assert all(t.endswith("\n") and 300 <= len(t) < 350 for _, t in docs[:-1])  # no blank line: at a line end
    assert "".join(t for _, t in docs) == lines
    assert [i for i, _ in docs] == [sum(t.count("\n") for _, t in docs[:k]) for k in range(len(docs))]


def test_folder_is_walked_recursively_in_order(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a.md").write_text("# Title\n\nMarkdown text.\n")
    (tmp_path / "b" / "deep" / "c.txt").write_text("Deep text.\n")
    (tmp_path / "b" / "image.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden")
    docs, stats = read([tmp_path])
    assert [t for _, t in docs] == ["# Title\n\nMarkdown text.\n", "Deep text.\n"]
    assert stats["files_read"] == 2 and stats["files_ignored_type"] == 1


def test_jsonl_text_and_chat_and_malformed_lines(tmp_path):
    lines = [
        json.dumps({"text": "plain text record"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        "{not json",
        json.dumps({"title": "no text field"}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"text": "last one"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs, stats = read([tmp_path / "d.jsonl"])
    assert [t for _, t in docs] == ["plain text record", "<|user|>hi<|end|><|assistant|>hello<|end|>", "last one"]
    assert [s.rsplit(":", 1)[1] for s, _ in docs] == ["1", "2", "8"]
    assert stats["jsonl_malformed_lines"] == 4
    assert stats["jsonl_records"] == 3


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "binary.txt").write_bytes(b"ELF\x00\x01\x02" * 100)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "late_bad.md").write_bytes(b"a" * 3_000_000 + b"\xff\xfe")  # bad bytes past the first chunk
    docs, stats = read([tmp_path])
    assert [t for _, t in docs] == ["fine text\n"]
    assert stats["files_skipped_binary"] == 1
    assert stats["files_skipped_not_utf8"] == 2
    assert stats["files_read"] == 1


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="source not found: .*nope"):
        check_sources([tmp_path / "nope"])


def test_builtin_corpus_is_python_documentation():
    docs = []
    for doc in builtin_documents():
        docs.append(doc)
        if len(docs) >= 200:
            break
    sources = {src.split(":")[1] for src, _ in docs}
    assert "pydoc_data.topics" in sources
    assert any("statement" in text for _, text in docs)
    assert all(len(text) <= 4 * 8000 for _, text in docs)
