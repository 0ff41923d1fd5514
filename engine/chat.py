"""The chat template: the one way a conversation becomes tokens, for data, training, chat, serving and export.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`:
an optional system message first, then user and assistant turns alternating, starting with user.
Rendered (template `workbench-chat-v1`, the tokenizer's reserved special tokens):

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

The loss mask is 1 on each assistant message's content and its <|end|> (what to say, and when to
stop) and 0 elsewhere: <|bos|>, system and user messages, and the <|assistant|> marker, which the
chat itself writes to ask for a reply. For generation (`render_prompt`) the conversation ends with a
user message and the prompt ends with <|assistant|>; the reply runs up to the model's <|end|>.

Content is text: a special token's string typed inside it ("<|end|>") is encoded as ordinary
characters, never as the special id, so no message can forge a turn. `render_text` is the same
conversation as text without <|bos|> (what `workbench prepare --flatten-chat` trains every token of).

Who calls what:
- data preparation: `check_messages` then `ChatTemplate.render_many` (ids + mask per conversation);
- training reads the packed rows and masks from the dataset (workbench.engine.data.dataset);
- chat CLI and server: `check_messages(..., for_generation=True)`, `render_prompt` (drops the
  oldest turns when the context would overflow), stop on `end_id`, `reply_text` on the new ids;
- `show` prints a rendering with the trained tokens marked (`workbench prepare --show N`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from workbench.engine.errors import DataError

TEMPLATE = "workbench-chat-v1"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
CHAT_TOKENS = (BOS, *ROLE_TOKENS.values(), END, PAD)

# Why a conversation is refused, and what each reason means (a chat dataset's report counts them).
REASONS = {
    "not_a_list": "messages is not a non-empty list",
    "not_a_message": "a message is not an object with a role and a content",
    "unknown_role": "a role other than system, user or assistant",
    "content_not_text": "a content that is neither a string nor a list of text parts",
    "empty_content": "a message with empty content",
    "system_not_first": "a system message after the first message",
    "out_of_order": "turns do not alternate user, assistant, ... starting with user",
    "last_not_assistant": "the last turn is not the assistant's (nothing to train on)",
    "last_not_user": "the last turn is not the user's (nothing to reply to)",
    "too_long": "the last message alone does not fit the context",
}

_COLOR_TRAINED, _COLOR_OTHER, _COLOR_RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


class ChatError(ValueError):
    """A malformed conversation; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(REASONS[reason] + (f" ({detail})" if detail else ""))


def _content_text(content) -> str | None:
    """A string content, or an OpenAI-style list of text parts joined; None if it is neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def check_messages(messages, *, for_generation: bool = False) -> list[dict]:
    """The conversation as fresh `{"role", "content"}` dicts (other keys dropped), or ChatError.

    Roles: an optional system message first, then user/assistant alternating from user; for
    training the last turn is the assistant's, for generation (`for_generation`) the user's."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("not_a_list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError("not_a_message", f"message {i}")
        if m["role"] not in ROLES:
            raise ChatError("unknown_role", f"{m['role']!r} in message {i}")
        content = _content_text(m["content"])
        if content is None:
            raise ChatError("content_not_text", f"message {i}")
        if not content.strip():
            raise ChatError("empty_content", f"message {i}")
        out.append({"role": m["role"], "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise ChatError("out_of_order", "a system message alone")
    for i, m in enumerate(turns):
        if m["role"] == "system":
            raise ChatError("system_not_first")
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ChatError("out_of_order", f"{m['role']} where {'user' if i % 2 == 0 else 'assistant'} belongs")
    last = turns[-1]["role"]
    if for_generation and last != "user":
        raise ChatError("last_not_user")
    if not for_generation and last != "assistant":
        raise ChatError("last_not_assistant")
    return out


def render_text(messages: Iterable[dict]) -> str:
    """The conversation as text, "<|user|>hi<|end|><|assistant|>hello<|end|>" (roles and content checked,
    not their order: this is also how `--flatten-chat` writes any list of messages)."""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            raise ChatError("not_a_message", f"{m!r:.80}")
        content = _content_text(m.get("content"))
        if m.get("role") not in ROLES:
            raise ChatError("unknown_role", f"{m.get('role')!r:.80}")
        if content is None:
            raise ChatError("content_not_text", f"{m!r:.80}")
        parts.append(f"{ROLE_TOKENS[m['role']]}{content}{END}")
    return "".join(parts)


@dataclass
class Prompt:
    """What `render_prompt` returns: the ids to feed the model and how many leading turns were left out."""

    ids: list[int]
    dropped: int


class ChatTemplate:
    """The template bound to a tokenizer (workbench.engine.data.tokenizer.Tokenizer)."""

    name = TEMPLATE

    def __init__(self, tokenizer):
        special = getattr(tokenizer, "special_ids", {})
        missing = [t for t in CHAT_TOKENS if t not in special]
        if missing:
            raise DataError(f"this tokenizer has no chat tokens ({', '.join(missing)}): "
                            "use one made by `workbench prepare`")
        self.tokenizer = tokenizer
        self.bos_id, self.end_id, self.pad_id = special[BOS], special[END], special[PAD]
        self.role_ids = {role: special[tok] for role, tok in ROLE_TOKENS.items()}
        self.assistant_id = self.role_ids["assistant"]
        self._special_text = {special[t]: t for t in CHAT_TOKENS}
        self._special_re = re.compile("|".join(re.escape(t) for t in special))

    def encode_content(self, text: str) -> list[int]:
        """Token ids of message content; special-token strings in it become ordinary characters."""
        return self._encode_contents([text])[0]

    def _encode_contents(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        tok = self.tokenizer
        out = tok.encode_batch(texts, num_threads=threads) if len(texts) > 1 else [tok.encode(t) for t in texts]
        for i, text in enumerate(texts):
            if "<|" in text and self._special_re.search(text):
                # Encode each special string in two pieces ("<" and "|end|>"): same characters, no special id.
                ids, pos = [], 0
                for m in self._special_re.finditer(text):
                    ids += tok.encode(text[pos:m.start()]) + tok.encode(m.group()[:1]) + tok.encode(m.group()[1:])
                    pos = m.end()
                out[i] = ids + tok.encode(text[pos:])
        return out

    def render(self, messages) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, mask uint8) of a training conversation (checked: ChatError if malformed)."""
        return self.render_many([messages])[0]

    def render_many(self, conversations: list, threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """`render` for many conversations, their contents encoded in one batch on `threads` threads."""
        checked = [check_messages(c) for c in conversations]
        contents = self._encode_contents([m["content"] for c in checked for m in c], threads)
        out, k = [], 0
        for conv in checked:
            ids, mask = [self.bos_id], [0]
            for m in conv:
                body = contents[k]
                k += 1
                ids += [self.role_ids[m["role"]], *body, self.end_id]
                mask += [0] + [int(m["role"] == "assistant")] * (len(body) + 1)
            out.append((np.array(ids, dtype=np.int32), np.array(mask, dtype=np.uint8)))
        return out

    def render_prompt(self, messages, max_tokens: int | None = None) -> Prompt:
        """Ids that ask for the next assistant reply: <|bos|>, the turns, then <|assistant|>.

        The conversation must end with a user message (ChatError otherwise). With `max_tokens`
        (the context minus the room kept for the reply), the oldest user/assistant pairs are left
        out until the prompt fits, the system message kept; `dropped` counts the messages left out.
        A last user message too long on its own is a ChatError."""
        messages = check_messages(messages, for_generation=True)
        system = messages[0]["role"] == "system"
        pieces = [[self.role_ids[m["role"]], *body, self.end_id]
                  for m, body in zip(messages, self._encode_contents([m["content"] for m in messages]), strict=True)]
        head = [self.bos_id] + (pieces[0] if system else [])
        body = pieces[int(system):]
        dropped = 0
        if max_tokens is not None:
            total = len(head) + sum(map(len, body)) + 1
            while total > max_tokens and len(body) > 1:
                total -= len(body[0]) + len(body[1])  # a user turn and the reply to it
                body, dropped = body[2:], dropped + 2
            if total > max_tokens:
                raise ChatError("too_long", f"{total} tokens, {max_tokens} allowed")
        return Prompt([*head, *(i for piece in body for i in piece), self.assistant_id], dropped)

    def reply_text(self, ids) -> str:
        """The text of generated ids, up to (not including) the first <|end|>."""
        ids = [int(i) for i in ids]
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self.tokenizer.decode(ids)

    def _text(self, ids) -> str:
        """Ids as text with every special token written out (the tokenizer's decode drops <|bos|> and <|pad|>)."""
        out, run = [], []
        for i in map(int, ids):
            if i in self._special_text:
                if run:
                    out.append(self.tokenizer.decode(run))
                    run = []
                out.append(self._special_text[i])
            else:
                run.append(i)
        if run:
            out.append(self.tokenizer.decode(run))
        return "".join(out)

    def show(self, ids, mask, color: bool = False) -> str:
        """The rendering as text with the trained tokens marked: green when `color`, else [[in brackets]]."""
        parts, start = [], 0
        mask = np.asarray(mask)
        for end in [*np.flatnonzero(np.diff(mask.astype(np.int8))) + 1, len(mask)]:
            if end > start:
                text = self._text(ids[start:end])
                if color:
                    parts.append((_COLOR_TRAINED if mask[start] else _COLOR_OTHER) + text + _COLOR_RESET)
                else:
                    parts.append(f"[[{text}]]" if mask[start] else text)
            start = end
        return "".join(parts)
