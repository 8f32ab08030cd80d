"""The embedded corpus: English prose mined from the Python standard library's own source.

The ``tiny`` preset must run offline, so stage 1 (``python -m scripts.download --dataset
embedded``) builds its pretraining text from something every machine already has: the
docstrings, long string literals (``pydoc_data/topics.py`` holds the language reference)
and comment blocks of the stdlib's ``.py`` files. Files are parsed with ``ast``, never
imported, so nothing runs. The result is ~2.4 M characters (~680 documents) on CPython 3.11.

Deterministic: files are walked in sorted path order, pieces kept in source order, the
validation modules chosen by a SHA-256 of the module path (Python's ``hash()`` is salted per
process). The same Python version gives byte-identical documents on every run.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sysconfig
from pathlib import Path

# Folders never mined: test suites (code-heavy and huge), third-party packages.
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
# Build-machine specifics (compiler flags, install paths): not prose, and not the same on two
# machines with the same Python version.
SKIP_FILE_PREFIXES = ("_sysconfigdata",)

CODING_COOKIE = re.compile(r"coding[:=]")  # PEP 263
MIN_DOCSTRING_CHARS = 100  # shorter ones are mostly "Return x." one-liners
MIN_BLOCK_CHARS = 200  # long string literals and comment blocks: shorter ones are noise
MIN_PROSE_FRACTION = 0.7  # letters + whitespace share; drops code tables, keeps doctests
MAX_DOC_CHARS = 10_000  # the tokenizer trainer caps documents at 10K chars
VALIDATION_PERCENT = 5


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """The stdlib's .py files in sorted relative-path order, tests and site-packages left out."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(SKIP_FILE_PREFIXES):
            continue
        found.append(rel)
    return [root / rel for rel in sorted(found, key=lambda r: r.as_posix())]


def _is_prose(text: str) -> bool:
    wordy = sum(1 for ch in text if ch.isalpha() or ch.isspace())
    return wordy >= MIN_PROSE_FRACTION * len(text)


def _add_block(pieces: list[tuple[int, str]], start: int, lines: list[str]) -> None:
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(text) >= MIN_BLOCK_CHARS:
        pieces.append((start, text))


def module_pieces(source: bytes) -> list[str]:
    """Docstrings, long string literals and comment blocks of one file, in source order.

    Raises SyntaxError/ValueError for a file ``ast`` cannot parse.
    """
    tree = ast.parse(source)
    pieces: list[tuple[int, str]] = []  # (first line, text), filtered by length already
    docstring_nodes = set()
    # Lines inside multi-line string literals: a "#" there is text, not a comment.
    in_string: set[int] = set()
    # One breadth-first walk: a definition is seen before its docstring's Constant node.
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc is not None:
                docstring_nodes.add(id(node.body[0].value))
                if len(doc) >= MIN_DOCSTRING_CHARS:
                    pieces.append((node.body[0].lineno, doc))
            continue
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            in_string.update(range(node.lineno + 1, node.end_lineno + 1))
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstring_nodes
            and len(node.value) >= MIN_BLOCK_CHARS
        ):
            pieces.append((node.lineno, inspect.cleandoc(node.value).strip()))

    # Full-line comments on consecutive lines form one block.
    block: list[str] = []
    block_start = last = 0
    lines = source.decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if number in in_string or not stripped.startswith("#"):
            continue
        text = stripped.lstrip("#").strip()
        if number <= 2 and (stripped.startswith("#!") or CODING_COOKIE.search(text)):
            continue  # "#!/usr/bin/env python3", "-*- coding: utf-8 -*-"
        if not any(ch.isalnum() for ch in text):
            text = ""  # a ruler like "# -----": keep only the paragraph break
        if block and number != last + 1:
            _add_block(pieces, block_start, block)
            block = []
        if not block:
            block_start = number
        block.append(text)
        last = number
    if block:
        _add_block(pieces, block_start, block)

    pieces.sort(key=lambda item: item[0])  # stable: ties keep discovery order
    return [text for _, text in pieces if _is_prose(text)]


def _chunks(pieces: list[str]) -> list[str]:
    """Join pieces with blank lines into documents of at most MAX_DOC_CHARS (a longer piece
    stays whole, alone)."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + 2 + len(piece) > MAX_DOC_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece) + (2 if size else 0)
    if current:
        docs.append("\n\n".join(current))
    return docs


def is_validation(module: str) -> bool:
    """Stable ~5% of modules (by path), so all parts of a module land in the same split."""
    digest = hashlib.sha256(module.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


def build_corpus(root: Path | None = None) -> list[tuple[str, str]]:
    """[(name, text)] in deterministic order; name is ``<relative/path.py>#<part>``.

    Pieces seen before (licence headers, copied docstrings) are dropped, so a text appears
    once in the whole corpus.
    """
    root = stdlib_root() if root is None else Path(root)
    seen: set[str] = set()
    corpus: list[tuple[str, str]] = []
    for path in source_files(root):
        try:
            pieces = module_pieces(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # Python 2 leftovers, odd encodings: not worth a special case
        fresh = []
        for piece in pieces:
            if piece not in seen:
                seen.add(piece)
                fresh.append(piece)
        module = path.relative_to(root).as_posix()
        for part, text in enumerate(_chunks(fresh)):
            corpus.append((f"{module}#{part}", text))
    return corpus


def split_corpus(corpus: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(training texts, validation texts), each in corpus order."""
    train, val = [], []
    for name, text in corpus:
        (val if is_validation(name.rsplit("#", 1)[0]) else train).append(text)
    return train, val
