"""Chat screen Pilot tests: a real `workbench serve` child on a trained tiny (base) run, replies streamed
into the transcript, a second turn, a new conversation, good/bad/edit feedback in conversations.jsonl,
the base-model warning; and the chat key on the runs list and the dashboard."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from textual.widgets import Input, Static
from workbench_pilot import finished_events, run_app, wait_for, write_events

from workbench.screens.chat import ChatScreen, format_settings, from_one_line, one_line, parse_settings
from workbench.screens.dashboard import DashboardScreen
from workbench.screens.standalone import ScreenApp


def records(run: Path) -> list[dict]:
    path = run / "conversations.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def turns(screen) -> list[str]:
    return [str(w.render()) for w in screen.query(".turn").results(Static)]


def test_chat_streams_replies_and_records_feedback(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    pieces: list[str] = []

    async def main():
        app = ScreenApp(lambda: ChatScreen(run))
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            original = screen._add_piece

            def spy(piece):
                pieces.append(piece)
                original(piece)
            screen._add_piece = spy
            await wait_for(pilot, lambda: screen.info is not None, timeout=180, what="the chat service")
            assert "base model" in str(screen.query_one("#chat-warning", Static).render())
            assert isinstance(app.focused, Input) and app.focused.id == "chat-input"
            # the default reply length was cut to fit this 32-token model's context
            assert screen.settings["max_tokens"] == screen.info["context"] // 2

            await pilot.press("ctrl+t")  # settings: a short reply, greedy-ish
            edit = screen.query_one("#chat-edit", Input)
            assert app.focused is edit and "temperature=0.8" in edit.value
            edit.value = "temperature=0.5 top_p=0.9 max_tokens=8 seed=1"
            await pilot.press("enter")
            assert screen.settings == {"temperature": 0.5, "top_p": 0.9, "max_tokens": 8, "seed": 1}
            assert app.focused.id == "chat-input"

            await pilot.press(*"Hello")
            await pilot.press("enter")
            await wait_for(pilot, lambda: not screen.generating and len(screen.messages) == 2, timeout=60,
                           what="the first reply")
            first = screen.messages[1]["content"]
            assert pieces and "".join(pieces) == first
            conv = screen.conversation
            assert conv and turns(screen)[1] == "model: " + first

            await pilot.press("ctrl+g")
            await pilot.press(*"Again")
            await pilot.press("enter")
            await wait_for(pilot, lambda: not screen.generating and len(screen.messages) == 4, timeout=60,
                           what="the second reply")
            assert screen.conversation == conv
            assert len(turns(screen)) == 4
            await pilot.press("ctrl+f")
            await pilot.press("ctrl+r")
            assert app.focused is edit and edit.value == one_line(screen.messages[3]["content"])
            edit.value = "A better reply.\\nTwo lines."
            await pilot.press("enter")
            assert app.focused.id == "chat-input"

            await pilot.press("ctrl+n")
            assert screen.messages == [] and screen.conversation is None and turns(screen) == []
            service = screen.service
            assert service is not None and service.poll() is None
            await pilot.press("escape")
            await pilot.pause()
        return service

    service = asyncio.run(main())
    assert service.wait(timeout=10) is not None  # the child is stopped when the screen is left
    recs = records(run)
    convs = [r for r in recs if r["type"] == "conversation"]
    assert {r["id"] for r in convs} == {convs[0]["id"]} and len(convs) == 2
    assert [m["role"] for m in convs[-1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert convs[-1]["settings"]["temperature"] == 0.5 and convs[-1]["settings"]["max_tokens"] == 8
    feedback = [(r["index"], r["rating"], r["correction"]) for r in recs if r["type"] == "feedback"]
    assert feedback == [(1, "good", None), (3, "bad", None), (3, None, "A better reply.\nTwo lines.")]


def test_settings_and_one_line_round_trip():
    s = parse_settings("temperature=0.2 top_p=0.5", {"temperature": 0.8, "top_p": 1.0, "max_tokens": 64})
    assert s == {"temperature": 0.2, "top_p": 0.5, "max_tokens": 64}
    assert parse_settings(format_settings(s), {}) == s
    for bad in ("temperature=hot", "top_p=0", "colour=red", "temperature"):
        with pytest.raises(ValueError):
            parse_settings(bad, s)
    text = "a\nb \\n c\\"
    assert from_one_line(one_line(text)) == text and "\n" not in one_line(text)


def test_chat_key_on_runs_list_and_dashboard(tmp_path, monkeypatch):
    run = write_events(tmp_path / "runs" / "done", finished_events())
    opened: list[Path] = []
    monkeypatch.setattr(ChatScreen, "on_mount", lambda self: opened.append(self.run_dir))

    async def body(pilot, app):
        await wait_for(pilot, lambda: app.screen.runs, what="the run listed")
        assert "chat" in {a.binding.action for a in app.screen.active_bindings.values()}
        assert any(b.action == "chat" and b.show for b in app.screen.BINDINGS)
        await pilot.press("h")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen) and opened == [run]
        app.pop_screen()
        await pilot.pause()
        app.push_screen(DashboardScreen(run))
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Chat with the run" in titles
        await pilot.press("h")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen) and opened == [run, run]

    run_app(tmp_path, body)
