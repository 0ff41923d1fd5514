"""`workbench chat RUN`: a multi-turn chat with a run's checkpoint in the terminal, tokens printed as they come.

On a terminal: type a message; `/clear` starts a new conversation, `/system TEXT` sets the system
message (and starts anew), `/temp X` and `/top_p X` change the sampling, `/quit` (or Ctrl-D) leaves.
When the context would overflow, the oldest turns are dropped, with a notice.

Not a terminal (stdin is a pipe or a file), or with --json: each line is the next user turn, an
empty line starts a new conversation, and each reply is one JSON object on stdout:
    {"reply": "...", "tokens": 12, "finish": "stop" | "length", "dropped": 0}
A base (not chat-tuned) run opens with a warning on stderr. Every conversation is kept in
RUN/conversations.jsonl (workbench.engine.conversations).
"""

from __future__ import annotations

import json
import sys

from workbench.engine import conversations as convlog
from workbench.engine.errors import ConfigError
from workbench.engine.formatting import terminal_safe

HELP = "commands: /clear  /system TEXT  /temp X  /top_p X  /quit"


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder (runs/NAME)")
    parser.add_argument("--checkpoint", metavar="NAME", help="checkpoint name (default: the latest)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1 = off)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="M",
                        help="tokens per reply (default: half the model's context, at most 256)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="same seed, same replies")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message to start with")
    parser.add_argument("--json", action="store_true", help="one JSON object per reply (as when stdin is not a tty)")


def _check_temperature(value: float) -> float:
    if not value >= 0:
        raise ConfigError(f"temperature must not be negative, got {value}")
    return value


def _check_top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {value}")
    return value


class Chat:
    """One conversation at a time with the service, each reply kept in conversations.jsonl."""

    def __init__(self, service, args):
        self.service, self.args = service, args
        self.temperature, self.top_p, self.system = args.temperature, args.top_p, args.system
        self.replies = 0
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.conv_id = convlog.new_id()
        self.dropped = 0  # messages the last prompt left out (a notice when it grows)

    def reply(self, text: str):
        """The Generation for the reply to `text`; the turn is added once the reply is complete."""
        seed = None if self.args.seed is None else self.args.seed + self.replies
        self.replies += 1
        messages = [*self.messages, {"role": "user", "content": text}]
        return messages, self.service.chat(messages, max_tokens=self.args.max_tokens, temperature=self.temperature,
                                           top_p=self.top_p, seed=seed)

    def keep(self, messages, gen) -> None:
        self.service.record(self.conv_id, messages, gen, "cli")
        # The whole conversation stays (and is kept): each prompt drops the oldest turns again as needed.
        self.messages = [*messages, {"role": "assistant", "content": gen.text}]


def run(args) -> int:
    _check_temperature(args.temperature)
    _check_top_p(args.top_p)
    from workbench.engine.serve import ChatService, RequestRefused

    service = ChatService.open(args.run, args.checkpoint)
    service.check_max_tokens(args.max_tokens)
    if (warning := service.warning()) is not None:
        print(warning, file=sys.stderr, flush=True)
    chat = Chat(service, args)
    try:
        if args.json or not sys.stdin.isatty():
            return _lines(chat, RequestRefused)
        return _terminal(chat, RequestRefused)
    except RequestRefused as e:
        raise ConfigError(str(e)) from None


def _lines(chat: Chat, RequestRefused) -> int:
    """Each input line a user turn, an empty line a new conversation, one JSON object per reply."""
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            chat.clear()
            continue
        messages, gen = chat.reply(text)
        gen.result()
        chat.keep(messages, gen)
        print(json.dumps({"reply": gen.text, "tokens": gen.tokens, "finish": gen.finish, "dropped": gen.dropped},
                         ensure_ascii=False), flush=True)
    return 0


def _terminal(chat: Chat, RequestRefused) -> int:
    svc = chat.service
    print(f"chatting with {svc.model_id} ({svc.checkpoint}, context {svc.seq_len} tokens). {HELP}")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        if not text.strip():
            continue
        if text.startswith("/"):
            if _command(chat, text.strip()):
                return 0
            continue
        try:
            messages, gen = chat.reply(text)
        except RequestRefused as e:
            print(f"error: {e}")
            continue
        print("bot> ", end="", flush=True)
        try:
            for piece in gen:
                print(terminal_safe(piece), end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            gen.close()
            print("\n(reply interrupted)")
            continue
        print()
        if gen.dropped > chat.dropped:
            print(f"(the context is full: the oldest {gen.dropped} messages are left out of the prompt)")
        chat.dropped = gen.dropped
        if gen.finish == "length":
            print(f"(reply cut at {gen.tokens} tokens)")
        chat.keep(messages, gen)


def _command(chat: Chat, text: str) -> bool:
    """Run a /command; True to quit."""
    name, _, value = text.partition(" ")
    value = value.strip()
    try:
        if name in ("/quit", "/exit"):
            return True
        if name == "/clear":
            chat.clear()
            print("(new conversation)")
        elif name == "/system":
            chat.system = value or None
            chat.clear()
            print(f"(system message {'set' if value else 'removed'}; new conversation)")
        elif name == "/temp":
            chat.temperature = _check_temperature(float(value))
            print(f"(temperature {chat.temperature})")
        elif name == "/top_p":
            chat.top_p = _check_top_p(float(value))
            print(f"(top_p {chat.top_p})")
        else:
            print(f"unknown command {name}; {HELP}")
    except ValueError as e:  # float('x'); ConfigError is a WorkbenchError, caught below
        print(f"error: {name} needs a number ({e})")
    except ConfigError as e:
        print(f"error: {e}")
    return False
