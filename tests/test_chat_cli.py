"""`workbench chat` in its non-terminal mode, and conversations.jsonl as data (written, torn lines, read back)."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_helpers import workbench

from workbench.engine import conversations as convlog


@pytest.fixture
def run(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def test_piped_chat_is_json_lines_with_a_new_conversation_per_empty_line(run):
    out = workbench("chat", run, "--json", "--temperature", "0", "--max-tokens", "8", input="hi\n\nhello\nmore\n")
    assert out.returncode == 0, out.stderr
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(replies) == 3
    for r in replies:
        assert set(r) >= {"reply", "tokens", "finish"} and r["finish"] in ("stop", "length")
        assert isinstance(r["reply"], str) and 0 <= r["tokens"] <= 8
    assert "base model" in out.stderr  # the tiny run is not chat-tuned
    convs = convlog.conversations(convlog.path_of(run))
    assert [len(c["messages"]) for c in convs] == [2, 4]  # "hi"; then "hello", "more" in one conversation
    assert convs[1]["messages"][2] == {"role": "user", "content": "more"}
    assert convs[0]["settings"]["temperature"] == 0 and convs[0]["checkpoint"] == "step_000020"
    # Greedy: the same first reply again.
    again = workbench("chat", run, "--temperature", "0", "--max-tokens", "8", input="hi\n")
    assert json.loads(again.stdout)["reply"] == replies[0]["reply"]


def test_overflowing_context_drops_the_oldest_turns(run):
    turns = "".join(f"module {i}?\n" for i in range(4))
    out = workbench("chat", run, "--temperature", "0", "--max-tokens", "6", input=turns)
    assert out.returncode == 0, out.stderr
    dropped = [json.loads(line)["dropped"] for line in out.stdout.splitlines()]
    assert dropped[0] == 0 and dropped[-1] > 0  # context 32: the later prompts leave out the oldest turns
    assert len(convlog.conversations(convlog.path_of(run))[0]["messages"]) == 8  # the log keeps them all


def test_terminal_chat_streams_and_takes_commands(run):
    """On a terminal (a pty): a prompt, streamed replies, the commands, /quit."""
    import os
    import pty
    import select
    import sys
    import time

    from engine_helpers import cli_env

    pid, fd = pty.fork()
    if pid == 0:  # the child: the real command on the pty
        os.execvpe(sys.executable, [sys.executable, "-m", "workbench.cli", "chat", str(run), "--max-tokens", "4",
                                    "--temperature", "0"], cli_env())
    out = b""

    def until_prompt(timeout=60):  # the next "you> " after what was read so far
        nonlocal out
        start, deadline = len(out), time.monotonic() + timeout
        while time.monotonic() < deadline and not out[start:].rstrip().endswith(b"you>"):
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return

    try:
        until_prompt()
        for line in [b"hi\n", b"/temp 0.5\n", b"/top_p x\n", b"/system Be brief.\n", b"hello\n", b"/quit\n"]:
            os.write(fd, line)
            until_prompt()
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, text
    assert "base model" in text and text.count("bot> ") == 2 and "(temperature 0.5)" in text
    assert "/top_p needs a number" in text and "system message set" in text
    assert [len(c["messages"]) for c in convlog.conversations(convlog.path_of(run))] == [2, 3]  # system kept


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-tokens", "1000"], "max_tokens"),
    (["--checkpoint", "step_999999"], "step_999999"),
])
def test_bad_arguments_are_one_line_and_exit_non_zero(run, args, message):
    out = workbench("chat", run, *args, input="hi\n")
    assert out.returncode != 0 and message in out.stderr
    assert out.stderr.strip().count("\n") <= 1 and "Traceback" not in out.stderr


def test_conversations_file_tolerates_torn_lines_and_reads_back_as_training_data(tmp_path):
    run = tmp_path
    settings = {"temperature": 0.8}
    a, b, c = "c-a", "c-b", "c-c"
    convlog.record_conversation(run, a, [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"}],
                                source="cli", checkpoint="step_1", settings=settings, finish="stop")
    two = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}]
    convlog.record_conversation(run, a, two, source="cli", checkpoint="step_1", settings=settings, finish="stop")
    convlog.record_conversation(run, b, two, source="http", checkpoint="step_1", settings=settings, finish="stop")
    convlog.record_conversation(run, c, two[:2], source="tui", checkpoint="step_1", settings=settings)
    convlog.record_feedback(run, a, 3, correction="better r2")   # corrected: used instead
    convlog.record_feedback(run, b, 3, rating="bad")             # bad: cut before it (and its question)
    convlog.record_feedback(run, c, 1, rating="bad")             # nothing left: skipped
    path = convlog.path_of(run)
    with open(path, "ab") as f:
        f.write(b'{"schema": 1, "type": "conversation", "id": "c-torn", "messa')  # a crash mid-write
    convs = convlog.conversations(path)
    assert [x["id"] for x in convs] == [a, b, c] and len(convs[0]["messages"]) == 4
    assert convs[1]["feedback"] == {3: {"rating": "bad", "correction": None}}
    data = list(convlog.training_conversations(path))
    assert data == [
        [*two[:3], {"role": "assistant", "content": "better r2"}],
        two[:2],
    ]
    # A torn line in the middle (a crash, then more lines appended) is skipped too.
    with open(path, "ab") as f:
        f.write(b"\n")
    convlog.record_conversation(run, "c-d", two[:2], source="cli", checkpoint="s", settings={}, finish="stop")
    assert [x["id"] for x in convlog.conversations(path)][-1] == "c-d"
    with pytest.raises(ValueError):
        convlog.record_feedback(run, a, 1, rating="meh")
