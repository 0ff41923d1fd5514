"""The built-in chat data: conversations about Python, made offline from what every Python install ships.

`workbench prepare --builtin-chat` (builtin.py's documentation corpus is the base model's; this is
its chat counterpart). The recipe, deterministic (the same Python gives the same conversations, in
the same order): it runs in a fresh `python -I -S` (no environment, no site-packages), so neither
hash seeds nor what the calling process imported or patched (a test runner's hooks, torch's
inspect.getfile) change the data, and the caller does not get two hundred modules imported.

1. Subjects.
   - Standard-library modules: the public names of `sys.stdlib_module_names` less `_SKIP_MODULES`
     (GUIs, side effects on import, other platforms' modules, internals, the deprecated "dead
     batteries"), plus the well-known submodules in `_SUBMODULES`; imported with warnings and
     output silenced; one that fails to import is left out.
   - Their public functions and classes: the names in the module's `__all__`, or else the ones
     defined in it; each object once, named by the first module that has it (os.path.join, not
     posixpath.join). The methods of the built-in types (str.split, dict.get) too.
   - Language topics: `pydoc_data.topics` (what `help("assert")` shows), asked about by their title
     and, for keywords, by the keyword (`pydoc.Helper.keywords`).
2. Answers: the first prose paragraph of the subject's documentation (its docstring, or its topic),
   reST markup and links removed, lines joined, cut at a sentence end to at most MAX_ANSWER_CHARS
   characters so a conversation fits a small model's context; a function's or class's answer opens
   with its signature (`inspect.signature`, shortened past MAX_SIGNATURE_CHARS; none that shows a
   memory address). A subject with no usable paragraph, or whose paragraph another subject already
   gave, is left out: one answer, one subject.
3. Questions: each subject is asked in PHRASINGS_PER_SUBJECT of its kind's phrasings, picked by a
   CRC32 of its name; one conversation in SYSTEM_EVERY opens with a system message.
4. Multi-turn: the subjects of one module (or the methods of one type) are paired in order; one pair
   in FOLLOW_UP_EVERY becomes a conversation of two questions, the second a follow-up ("And
   json.loads?") about the other function of the same module.
5. Every conversation carries a group, its module or topic, so the val split holds out whole modules
   and topics: no val answer is seen, under another phrasing, in training.
Exact duplicates (same messages) are left out. Measured with Python 3.11.7 on a 2-core CPU: 7,131
conversations (474 with a follow-up, 931 with a system message, 266 groups) made in about 1.1 s,
the child interpreter included; with a 4,096-piece tokenizer of the built-in corpus they are 357k
tokens, 215k of them trained, and 31 are longer than the default 128-token rows (cut to them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import re
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass

SOURCE = "builtin-chat"
MAX_ANSWER_CHARS = 240
MIN_ANSWER_CHARS = 20
MAX_SIGNATURE_CHARS = 60
PHRASINGS_PER_SUBJECT = 3
SYSTEM_EVERY = 8
FOLLOW_UP_EVERY = 2
_UNINFORMATIVE_SIGNATURES = {"()", "(*args, **kwargs)", "(*args, **kwds)", "(/, *args, **kwargs)"}

_SKIP_MODULES = {
    # GUIs, a browser, printing or terminal changes on import
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline", "rlcompleter",
    # tools, internals and other platforms' modules
    "ensurepip", "venv", "lib2to3", "distutils", "pydoc_data", "encodings", "genericpath", "sre_compile",
    "sre_constants", "sre_parse", "ntpath", "nturl2path", "nt", "msvcrt", "winreg", "winsound", "msilib",
    # PEP 594's dead batteries (deprecated in 3.11, gone in 3.13)
    "aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "imp", "mailcap",
    "nis", "nntplib", "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",
}
_SUBMODULES = (
    "collections.abc", "concurrent.futures", "email.message", "email.utils", "html.parser", "http.client",
    "http.server", "importlib.resources", "importlib.util", "logging.handlers", "os.path", "unittest.mock",
    "urllib.parse", "urllib.request", "xml.dom.minidom", "xml.etree.ElementTree",
)

PHRASINGS = {
    "function": ("What does {n} do?", "What does `{n}` do?", "What is {n} for?", "Explain {n}.",
                 "What does the function {n} do in Python?", "Can you tell me what {n} does?",
                 "How would you describe {n}?", "Briefly, what does {n}() do?"),
    "method": ("What does {n} do?", "What does the {m} method of {c} do?", "Explain {n}.",
               "What is {n} for?", "What does `{n}` do in Python?", "Can you tell me what {c}.{m}() does?"),
    "class": ("What is {n}?", "What is the {n} class?", "Explain the class {n}.", "What is {n} used for?",
              "Describe `{n}`.", "Can you tell me about the {n} class?"),
    "module": ("What is the {n} module?", "What is the {n} module for?", "What does the {n} module do?",
               "Explain the Python module {n}.", "Tell me about the `{n}` module.", "What is in the {n} module?"),
    "topic": ("Tell me about {t}.", "Explain {t} in Python.", "What does the Python reference say about {t}?",
              "Can you explain {t}?"),
    "keyword": ("What does the `{k}` keyword do?", "What is `{k}` in Python?", "How is the {k} keyword used?",
                "Explain the {k} keyword."),
}
FOLLOW_UPS = ("And {n}?", "What about {n}?", "And what does {n} do?", "How about {n}?")
SYSTEM_PROMPTS = ("You are a helpful assistant who answers questions about Python.",
                  "Answer questions about the Python standard library briefly.",
                  "You are a concise Python expert.")


@dataclass
class Subject:
    name: str  # "json.dumps", "str.split", "json", "assert" (a topic)
    kind: str  # a PHRASINGS key other than "keyword"
    answer: str
    group: str  # the split unit: "module:json", "topic:assert"
    questions: tuple[str, ...]  # its kind's phrasings, filled in


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`x`, :class:`~a.B`
_LINK = re.compile(r"\s*<https?://[^>]*>")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _prose(text: str) -> str:
    """One paragraph as plain text on one line: reST roles and links removed, ``x`` as x."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text)
    text = _LINK.sub("", text).replace("``", "")
    return " ".join(text.split())


def _cut(text: str) -> str | None:
    """`text` cut at a sentence end to at most MAX_ANSWER_CHARS, or None if that is impossible or too short."""
    if text.endswith(":") or "<|" in text or ">>>" in text:
        return None
    if len(text) > MAX_ANSWER_CHARS:
        ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, MAX_ANSWER_CHARS + 1)]
        if not ends:
            return None
        text = text[: ends[-1]]
    if text[-1] not in ".!?":
        text += "."
    return text if len(text) >= MIN_ANSWER_CHARS and len(text.split()) >= 3 else None


def _first_paragraph(doc: str | None, name: str) -> str | None:
    """The first prose paragraph of a docstring, skipping signature lines ("f(x) -> y") and code."""
    if not isinstance(doc, str):
        return None
    short = name.rsplit(".", 1)[-1]
    for para in inspect.cleandoc(doc).split("\n\n"):
        para = para.strip("\n")
        if not para.strip() or para.startswith((" ", "\t")) or "->" in para or para.startswith(short + "("):
            continue
        return _cut(_prose(para))
    return None


def _signature(obj, is_method: bool) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if is_method and params and params[0].name in ("self", "cls"):
        sig = sig.replace(parameters=params[1:])
    text = str(sig.replace(return_annotation=inspect.Signature.empty))
    if " at 0x" in text or text in _UNINFORMATIVE_SIGNATURES:  # an address differs in every process
        return None
    if len(text) > MAX_SIGNATURE_CHARS:
        cut = text.rfind(", ", 0, MAX_SIGNATURE_CHARS - 5)
        text = text[:cut] + ", ...)" if cut > 0 else "(...)"
    return text


def _import_modules() -> list[tuple[str, object]]:
    names = sorted({n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES}
                   | set(_SUBMODULES))
    modules = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ["builtins", *(n for n in names if n != "builtins")]:
            try:
                modules.append((name, importlib.import_module(name)))
            except Exception:  # not built here (e.g. no curses): left out, never fatal
                continue
    return modules


def _public_members(name: str, module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [k for k, v in vars(module).items() if getattr(v, "__module__", None) == name]
    out = []
    for key in sorted({n for n in names if isinstance(n, str) and not n.startswith("_")}):
        obj = getattr(module, key, None)
        if obj is not None and not inspect.ismodule(obj) and callable(obj):
            out.append((key, obj))
    return out


class _Subjects:
    """Collects subjects in order, one per object and one per answer paragraph."""

    def __init__(self):
        self.items: list[Subject] = []
        self.by_group: dict[str, list[Subject]] = {}  # the subjects a follow-up may pair
        self._objects: set[int] = set()
        self._answers: set[str] = set()
        self._keep: list[object] = []  # holds the objects whose id() is in _objects

    def add(self, name: str, kind: str, paragraph: str | None, group: str, questions: tuple[str, ...],
            obj=None, signature=None, pairable: bool = False) -> None:
        """`signature`: a function giving the signature text or None, called only for a subject kept."""
        if obj is not None:
            if id(obj) in self._objects:
                return
            self._objects.add(id(obj))
            self._keep.append(obj)
        if paragraph is None or paragraph in self._answers:
            return
        self._answers.add(paragraph)
        signature = signature() if signature else None
        answer = f"{name}{signature}: {paragraph}" if signature else paragraph
        subject = Subject(name, kind, answer, group, questions)
        self.items.append(subject)
        if pairable:
            self.by_group.setdefault(group, []).append(subject)


def _library_subjects(subjects: _Subjects) -> None:
    for modname, module in _import_modules():
        is_builtins = modname == "builtins"
        group = f"module:{modname}"
        if not is_builtins:
            subjects.add(modname, "module", _first_paragraph(module.__doc__, modname), group,
                         _phrases("module", n=modname))
        for key, obj in _public_members(modname, module):
            name = key if is_builtins else f"{modname}.{key}"
            if is_builtins and inspect.isclass(obj) and issubclass(obj, BaseException):
                group = "module:builtins.exceptions"
            else:
                group = f"module:{modname}"
            kind = "class" if inspect.isclass(obj) else "function"
            subjects.add(name, kind, _first_paragraph(obj.__doc__, name), group, _phrases(kind, n=name), obj,
                         functools.partial(_signature, obj, False), pairable=True)
            if is_builtins and inspect.isclass(obj) and not issubclass(obj, BaseException):
                _method_subjects(subjects, key, obj)


def _method_subjects(subjects: _Subjects, cls_name: str, cls) -> None:
    for key in sorted(vars(cls)):
        obj = vars(cls)[key]
        if key.startswith("_") or not callable(getattr(cls, key, None)):
            continue
        name = f"{cls_name}.{key}"
        subjects.add(name, "method", _first_paragraph(getattr(obj, "__doc__", None), name), f"type:{cls_name}",
                     _phrases("method", n=name, c=cls_name, m=key), obj,
                     functools.partial(_signature, getattr(cls, key), True), pairable=True)


def _topic_paragraph(text: str) -> str | None:
    lines = text.split("\n")
    paragraphs, current = [], []
    for i, line in enumerate(lines):
        underline = i + 1 < len(lines) and lines[i + 1] and set(lines[i + 1]) <= set("*=-~^")
        if underline or (line and set(line) <= set("*=-~^")):
            continue  # a title and its underline
        if not line.strip():
            if current:
                paragraphs.append(current)
            current = []
        else:
            current.append(line)
    if current:
        paragraphs.append(current)
    for para in paragraphs:
        if not para[0].startswith(" "):
            text = _prose("\n".join(para))
            # "... is used to iterate over ...:" introduces a grammar block: the sentence stands alone
            return _cut(text[:-1] + "." if text.endswith(":") else text)
    return None


def _topic_title(text: str) -> str:
    title = text.split("\n", 1)[0].strip()
    return title[:1].lower() + title[1:] if not title[1:2].isupper() else title


def _keyword_topics() -> dict[str, list[str]]:
    """topic -> the keywords whose help is that topic (pydoc.Helper's tables)."""
    import pydoc

    out: dict[str, list[str]] = {}
    for keyword in sorted(pydoc.Helper.keywords):
        target = pydoc.Helper.keywords[keyword]
        for _ in range(4):  # "elif" -> "if" -> ("if", ...); "is" -> "COMPARISON" -> ("comparisons", ...)
            if not isinstance(target, str) or not target:
                break
            target = pydoc.Helper.keywords.get(target) or pydoc.Helper.topics.get(target) or ""
        if isinstance(target, tuple) and target:
            out.setdefault(target[0], []).append(keyword)
    return out


def _topic_subjects(subjects: _Subjects) -> None:
    from pydoc_data.topics import topics

    keywords = _keyword_topics()
    for name in sorted(topics):
        text = topics[name]
        questions = _phrases("topic", t=_topic_title(text))
        for keyword in keywords.get(name, []):
            questions += _phrases("keyword", k=keyword)
        subjects.add(name, "topic", _topic_paragraph(text), f"topic:{name}", questions)


def _phrases(kind: str, **names) -> tuple[str, ...]:
    return tuple(p.format(**names) for p in PHRASINGS[kind])


def _pick(options: tuple[str, ...], key: str, k: int) -> list[str]:
    """`k` of `options`, by a CRC32 of `key`: the same every run, different from subject to subject."""
    start = _crc(key) % len(options)
    step = 1 + _crc(key + "/step") % max(1, len(options) - 1)
    picked: list[str] = []
    i = start
    while len(picked) < min(k, len(options)):
        if options[i] not in picked:
            picked.append(options[i])
        i = (i + step) % len(options)
        if i == start:  # step shares a factor with len(options): walk the rest in order
            picked += [o for o in options if o not in picked][: k - len(picked)]
    return picked


def _system(key: str) -> list[dict]:
    h = _crc(key + "/system")
    if h % SYSTEM_EVERY:
        return []
    return [{"role": "system", "content": SYSTEM_PROMPTS[(h // SYSTEM_EVERY) % len(SYSTEM_PROMPTS)]}]


def make_conversations() -> list[tuple[str, list[dict], str]]:
    """(source, messages, group) of every built-in conversation, in a fixed order (the recipe is the module's
    docstring). Run in a pristine interpreter by builtin_conversations: the calling process's imports and
    patches (a test runner's hooks, torch's inspect.getfile) must not change the data."""
    subjects = _Subjects()
    _topic_subjects(subjects)
    _library_subjects(subjects)
    out: list[tuple[str, list[dict], str]] = []
    seen: set[tuple] = set()

    def emit(source: str, messages: list[dict], group: str) -> None:
        key = tuple((m["role"], m["content"]) for m in messages)
        if key not in seen:
            seen.add(key)
            out.append((f"{SOURCE}:{source}", messages, group))

    for s in subjects.items:
        for i, question in enumerate(_pick(s.questions, s.name, PHRASINGS_PER_SUBJECT)):
            key = f"{s.name}/{i}"
            emit(f"{s.kind}:{s.name}:{i}", _system(key) + [{"role": "user", "content": question},
                                                          {"role": "assistant", "content": s.answer}], s.group)
    follow_ups = []
    for members in subjects.by_group.values():
        for a, b in zip(members[0::2], members[1::2], strict=False):
            if _crc(a.name + "/follow") % FOLLOW_UP_EVERY == 0:
                follow_ups.append((a, b))
    for a, b in follow_ups:
        first = _pick(a.questions, a.name + "/first", 1)[0]
        second = _pick(FOLLOW_UPS, b.name, 1)[0].format(n=b.name)
        emit(f"follow-up:{a.name}+{b.name}", _system(a.name + "+") + [
            {"role": "user", "content": first}, {"role": "assistant", "content": a.answer},
            {"role": "user", "content": second}, {"role": "assistant", "content": b.answer}], a.group)
    return out


# -I -S: no environment, no site-packages, no sitecustomize: only what the Python install ships.
_CHILD = "import json, runpy, sys; json.dump(runpy.run_path(sys.argv[1])['make_conversations'](), sys.stdout)"


def builtin_conversations():
    """The built-in conversations as chat records (workbench.engine.data.sources.ChatRecord), made by
    `make_conversations` in a fresh `python -I -S`, so that they are the same whatever this process did."""
    from workbench.engine.data.sources import ChatRecord  # here: the child runs this file without workbench
    from workbench.engine.errors import DataError

    child = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, __file__], capture_output=True, timeout=300)
    if child.returncode != 0:
        last = (child.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
        raise DataError(f"making the built-in chat data failed: {last}")
    return [ChatRecord(source, messages, None, sum(len(m["content"].encode("utf-8")) for m in messages), group)
            for source, messages, group in json.loads(child.stdout)]
