"""Chat with a run's checkpoint: a `workbench serve RUN` child answers, replies stream in as they are generated.

The service is started when the screen opens (engine_calls.start_chat_service) and stopped when it is
left, so torch stays in the child. Every reply is kept by the service in the run's conversations.jsonl
(under this screen's conversation id); good / bad / edit feedback on the last reply is written there too
(workbench.engine.conversations.record_feedback), ready to become chat training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Static

from workbench import engine_calls

DEFAULT_SETTINGS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 128}
SETTING_TYPES = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}


def parse_settings(text: str, current: dict[str, Any]) -> dict[str, Any]:
    """`temperature=0.7 top_p=0.9 max_tokens=64` into settings; ValueError naming what is wrong."""
    out = dict(current)
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or name not in SETTING_TYPES:
            raise ValueError(f"expected name=value with name one of {', '.join(SETTING_TYPES)}, got {item!r}")
        try:
            out[name] = SETTING_TYPES[name](value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0 <= out["temperature"] <= 2:
        raise ValueError("temperature must be between 0 and 2")
    if not 0 < out["top_p"] <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if out["max_tokens"] < 1:
        raise ValueError("max_tokens must be at least 1")
    return out


def format_settings(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def one_line(text: str) -> str:
    """A reply in a one-line input: newlines as \\n (and back with from_one_line)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def from_one_line(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "n\\":
            out.append("\n" if text[i + 1] == "n" else "\\")
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class ChatScreen(Screen):
    TITLE = "Chat"
    HELP = """\
Chat with the run's latest checkpoint. A `workbench serve` child loads it once when this
screen opens and stops when you leave. Type a message and press **enter**: the reply
streams in. Every reply is kept in the run's `conversations.jsonl`.

Feedback acts on the **last reply**: **ctrl+g** good, **ctrl+f** bad, **ctrl+r** edit
(write the reply it should have given: `\\n` is a new line; enter saves, escape cancels).
**ctrl+t** edits the settings (`temperature=0.8 top_p=0.95 max_tokens=128`), **ctrl+n**
starts a new conversation. A base (not chat-tuned) model continues text rather than answers.
"""

    DEFAULT_CSS = """
    ChatScreen #chat-status { height: 1; padding: 0 1; }
    ChatScreen #chat-warning { height: auto; padding: 0 1; }
    ChatScreen #transcript { height: 1fr; padding: 0 1; }
    ChatScreen .turn { margin: 0 0 1 0; }
    ChatScreen #chat-edit { border-title-color: $accent; }
    """

    BINDINGS = [
        Binding("ctrl+n", "new", "New", priority=True, tooltip="Start a new conversation"),
        Binding("ctrl+g", "feedback('good')", "Good", priority=True, tooltip="Rate the last reply good"),
        Binding("ctrl+f", "feedback('bad')", "Bad", priority=True, tooltip="Rate the last reply bad"),
        Binding("ctrl+r", "edit", "Edit", priority=True, tooltip="Write the reply it should have given"),
        Binding("ctrl+t", "settings", "Settings", priority=True, tooltip="Temperature, top_p, max_tokens"),
        Binding("escape", "back", "Back", tooltip="Back (or cancel the edit)"),
    ]
    LONG_NAMES = {"new": "New conversation", "feedback('good')": "Rate reply good",
                  "feedback('bad')": "Rate reply bad", "edit": "Edit reply", "settings": "Chat settings"}

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.settings = dict(DEFAULT_SETTINGS)
        self.messages: list[dict[str, str]] = []
        self.conversation: str | None = None
        self.info: dict[str, Any] | None = None
        self.warning: str | None = None
        self.service = None  # the `workbench serve` child
        self.generating = False
        self.editing: str | None = None  # "reply" | "settings" while the edit box is open
        self._leaving = False
        self._reply_widget: Static | None = None
        self._reply_text = ""

    def compose(self) -> ComposeResult:
        yield Label("", id="chat-status")
        yield Static("", id="chat-warning")
        yield VerticalScroll(id="transcript")
        yield Input(placeholder="starting the chat service…", id="chat-input", disabled=True)
        yield Input(id="chat-edit")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#chat-edit", Input).display = False
        self.query_one("#chat-warning", Static).display = False
        self._update_status("starting the service…")
        self.start_service()

    def on_unmount(self) -> None:
        self._leaving = True
        engine_calls.stop_chat_service(self.service)
        self.service = None

    # ------------------------------------------------------------ the service

    @work(thread=True, exclusive=True, group="chat-service")
    def start_service(self) -> None:
        try:
            child, info = engine_calls.start_chat_service(self.run_dir)
        except engine_calls.EngineCallError as e:
            self.app.call_from_thread(self._service_failed, str(e))
            return
        if self._leaving:
            engine_calls.stop_chat_service(child)
            return
        self.service = child
        self.app.call_from_thread(self._service_ready, info)

    def _service_failed(self, message: str) -> None:
        self._update_status("no service")
        self.notify(message, title="Chat", severity="error", timeout=10)

    def _service_ready(self, info: dict[str, Any]) -> None:
        self.info = info
        context = info.get("context")
        if isinstance(context, int) and self.settings["max_tokens"] >= context - 4:
            # a reply must leave room for the prompt: half the context, as the service's own default
            self.settings["max_tokens"] = max(1, context // 2)
        if not info.get("chat_tuned"):
            self.warning = (f"warning: {self.run_dir.name} is a base model, not chat-tuned: "
                            "replies continue text rather than answer")
            warn = self.query_one("#chat-warning", Static)
            warn.update(Text(self.warning, style="bold yellow"))
            warn.display = True
        box = self.query_one("#chat-input", Input)
        box.disabled = False
        box.placeholder = "message; enter sends"
        box.focus()
        self._update_status()

    # ------------------------------------------------------------ chatting

    @on(Input.Submitted, "#chat-input")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.generating or self.info is None:
            return
        event.input.value = ""
        self.messages.append({"role": "user", "content": text})
        self._add_turn("user", text)
        self._reply_text = ""
        self._reply_widget = self._add_turn("assistant", "…")
        self.generating = True
        self._update_status("generating…")
        self.generate(list(self.messages), dict(self.settings), self.conversation)

    @work(thread=True, exclusive=True, group="chat-generate")
    def generate(self, messages: list[dict], settings: dict[str, Any], conversation: str | None) -> None:
        from workbench.engine.errors import WorkbenchError
        from workbench.engine.serve import chat_stream

        try:
            for reply in chat_stream(self.run_dir, messages, conversation=conversation, **settings):
                if self._leaving:
                    return
                if "piece" in reply:
                    self.app.call_from_thread(self._add_piece, reply["piece"])
                else:
                    self.app.call_from_thread(self._reply_done, reply)
        except (WorkbenchError, OSError, ValueError) as e:
            if not self._leaving:
                self.app.call_from_thread(self._reply_failed, str(e) or type(e).__name__)

    def _add_piece(self, piece: str) -> None:
        self._reply_text += piece
        if self._reply_widget is not None:
            self._reply_widget.update(self._turn_text("assistant", self._reply_text))
            self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    def _reply_done(self, reply: dict[str, Any]) -> None:
        self.generating = False
        self.conversation = reply.get("conversation") or self.conversation
        text = reply.get("reply", self._reply_text)
        self._reply_text = text
        self.messages.append({"role": "assistant", "content": text})
        if self._reply_widget is not None:
            self._reply_widget.update(self._turn_text("assistant", text))
        self._update_status(f"{reply.get('tokens', 0)} tokens, {reply.get('finish')}")

    def _reply_failed(self, message: str) -> None:
        self.generating = False
        self.messages.pop()  # the user turn that got no reply
        if self._reply_widget is not None:
            self._reply_widget.update(Text(f"(no reply: {message})", style="red"))
        self._reply_widget = None
        self._update_status("failed")
        self.notify(message, title="Chat", severity="error", timeout=10)

    def action_new(self) -> None:
        if self.generating:
            self.notify("wait for the reply to finish", title="Chat", severity="warning")
            return
        self.messages, self.conversation = [], None
        self._reply_widget = None
        self.query_one("#transcript", VerticalScroll).remove_children()
        self._close_edit()
        self._update_status("new conversation")

    # ------------------------------------------------------------ feedback

    def _last_reply(self) -> int | None:
        """messages index of the last assistant reply, if it was recorded (a conversation id) and is done."""
        if self.generating or self.conversation is None or not self.messages:
            return None
        return len(self.messages) - 1 if self.messages[-1]["role"] == "assistant" else None

    def action_feedback(self, rating: str) -> None:
        from workbench.engine.conversations import record_feedback

        index = self._last_reply()
        if index is None:
            self.notify("no reply to rate yet", title="Chat", severity="warning")
            return
        record_feedback(self.run_dir, self.conversation, index, rating=rating)
        self._update_status(f"last reply rated {rating}")

    def action_edit(self) -> None:
        index = self._last_reply()
        if index is None:
            self.notify("no reply to edit yet", title="Chat", severity="warning")
            return
        self._open_edit("reply", one_line(self.messages[index]["content"]))

    def action_settings(self) -> None:
        self._open_edit("settings", format_settings(self.settings))

    def _open_edit(self, what: str, value: str) -> None:
        self.editing = what
        box = self.query_one("#chat-edit", Input)
        box.border_title = ("the reply it should have given (\\n: new line) · enter saves · esc cancels"
                            if what == "reply" else "settings · enter saves · esc cancels")
        box.value = value
        box.display = True
        box.focus()

    def _close_edit(self) -> None:
        self.editing = None
        box = self.query_one("#chat-edit", Input)
        box.display = False
        chat = self.query_one("#chat-input", Input)
        if not chat.disabled:
            chat.focus()

    @on(Input.Submitted, "#chat-edit")
    def save_edit(self, event: Input.Submitted) -> None:
        if self.editing == "settings":
            try:
                self.settings = parse_settings(event.value, self.settings)
            except ValueError as e:
                self.notify(str(e), title="Settings", severity="error")
                return
            self._close_edit()
            self._update_status("settings saved")
        elif self.editing == "reply":
            from workbench.engine.conversations import record_feedback

            index = self._last_reply()
            correction = from_one_line(event.value)
            if index is not None and correction.strip():
                record_feedback(self.run_dir, self.conversation, index, correction=correction)
                self._update_status("correction saved")
            self._close_edit()

    def action_back(self) -> None:
        if self.editing is not None:
            self._close_edit()
            return
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.exit()

    # ------------------------------------------------------------ display

    def _turn_text(self, role: str, text: str) -> Text:
        who = ("you: ", "bold cyan") if role == "user" else ("model: ", "bold green")
        return Text.assemble(who, text)

    def _add_turn(self, role: str, text: str) -> Static:
        turn = Static(self._turn_text(role, text), classes=f"turn {role}")
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(turn)
        transcript.scroll_end(animate=False)
        return turn

    def _update_status(self, note: str = "") -> None:
        s = self.settings
        where = f" · {self.info.get('checkpoint')}" if self.info else ""
        self.query_one("#chat-status", Label).update(Text.assemble(
            ("Chat ", "bold"), (self.run_dir.name, "bold"), where,
            f" · T {s['temperature']} · top_p {s['top_p']} · max {s['max_tokens']}",
            (f"  {note}" if note else "", "dim")))
