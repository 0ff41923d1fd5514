"""The built-in corpus: documentation that ships inside every Python install (no network).

- `pydoc_data.topics`: the language reference topics `help()` shows (about 0.5 MB);
- the docstrings of the standard library's own modules, classes and functions, read
  from the source files with `ast` (nothing is imported, so no module side effects),
  one document per module (about 1.5 MB).
Documents are cut to `doc_chars` at paragraph boundaries, like text files.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from workbench.engine.data.sources import DEFAULT_DOC_CHARS, split_documents

# Tests, demos and vendored tools: little prose, much repetition.
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo",
              "ensurepip", "__pycache__"}


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc.strip())
    return "\n\n".join(docs)


def builtin_documents(doc_chars: int = DEFAULT_DOC_CHARS) -> Iterator[tuple[str, str]]:
    """Yield (source, text) documents of the built-in corpus, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for _, text in split_documents([topics[name]], doc_chars):
            yield f"builtin:pydoc_data.topics:{name}", text

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(root) / name
            text = _module_docstrings(path)
            if text:
                rel = path.relative_to(stdlib)
                for _, part in split_documents([text], doc_chars):
                    yield f"builtin:stdlib:{rel}", part
