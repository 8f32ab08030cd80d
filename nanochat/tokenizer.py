"""The byte-level BPE tokenizer: training, encoding, saving, and chat rendering.

Stage 2 (``scripts/tok_train.py``) learns the merges with ``rustbpe`` and saves them under
``BASE_DIR/tokenizer/``; every later stage loads them with ``Tokenizer.load`` and encodes with
``tiktoken`` (fast, multi-threaded). Facts from the recipe (upstream nanochat):

- GPT-4's pre-tokenization regex, except that digits are grouped 1-2 at a time (not 1-3),
  which spends fewer vocabulary slots on numbers.
- Nine special tokens whose ids follow the learned vocabulary. ``vocab_size`` counts them, so
  BPE learns ``vocab_size - 9`` tokens (256 single bytes + merges).
- Plain ``encode`` never turns text such as ``"<|bos|>"`` into a special token: specials
  enter a sequence only through ``prepend``/``append`` or chat rendering, so user text can
  not forge a turn boundary.
- The byte length of every token (0 for specials) is saved for bits-per-byte; it is taken
  from the raw token bytes, never a str round trip, which would inflate tokens that are not
  valid UTF-8 on their own (e.g. half of a CJK character) to the 3-byte U+FFFD.

Files in ``BASE_DIR/tokenizer/``, each written atomically:
``merges.tiktoken`` (tiktoken's text format: base64 token, space, rank), ``token_bytes.json``
(byte length per id) and ``tokenizer.json`` (pattern, special ids, vocab size, what it was
trained on, the size and sha256 of the other two files, and a sha256 of its own content).
``tokenizer.json`` is written last, so its presence marks a complete tokenizer. ``load``
checks every recorded hash (a swapped merges line would silently change every encoding) and
raises ``TokenizerError``, one line naming the file and the fix, for a damaged or malformed
file; a tokenizer saved before the hashes existed loads with a one-time note.

Chat rendering turns a conversation into ``(ids, mask)`` for the chat stages, where mask 1
marks the tokens the model is trained to produce (the assistant's text and tool calls).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from nanochat.common import (
    ArtifactError,
    atomic_write_bytes,
    atomic_write_text,
    log,
    one_line,
)
from nanochat.model.dial import SEQ_LEN

# GPT-4's split pattern (cl100k) with \p{N}{1,2} in place of \p{N}{1,3}.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = (
    "<|bos|>",  # begins every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output is fed back, not generated
    "<|output_end|>",
)

# 256 single bytes + the specials + at least one merge, or there is nothing to learn.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1

MERGES_FILE = "merges.tiktoken"
TOKEN_BYTES_FILE = "token_bytes.json"
META_FILE = "tokenizer.json"  # written last: marks a complete tokenizer
FORMAT_VERSION = 1  # the hashes are optional keys: older code still reads newer files
FIX = "run `make tokenizer` to train it again, or restore the tokenizer folder from a copy"


class TokenizerError(ArtifactError):
    """A damaged or malformed tokenizer file; the message names it and the fix, in one line.
    An ArtifactError: a stage's ``run_main`` reports it in one line as work that failed
    (exit 1), not as bad input."""


def tokenizer_dir(base: Path) -> Path:
    """Where the tokenizer lives under the artifacts root."""
    return Path(base) / "tokenizer"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn a BPE vocabulary of ``vocab_size`` tokens (specials included) from ``texts``.

    ``texts`` is consumed once, as a stream. A corpus too small to yield that many distinct
    merges gives a smaller vocabulary; compare ``vocab_size`` of the result.
    """
    import rustbpe

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge), got {vocab_size}"
        )
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(
        iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN
    )
    ranked = sorted(trainer.get_mergeable_ranks(), key=lambda pair: pair[1])
    if [rank for _, rank in ranked] != list(range(len(ranked))):
        raise RuntimeError("rustbpe returned non-contiguous ranks")
    return Tokenizer([token for token, _ in ranked], pattern=trainer.get_pattern())


class Tokenizer:
    """A trained BPE vocabulary plus the special tokens, encoding through tiktoken.

    ``token_bytes[i]`` is the raw byte string of id ``i`` (its BPE rank); special tokens
    take the ids right after the last learned token, in ``SPECIAL_TOKENS`` order.
    ``trained_on`` is free metadata the trainer fills in (dataset, chars, docs, ...).
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        pattern: str = SPLIT_PATTERN,
        trained_on: Mapping[str, object] | None = None,
    ):
        import tiktoken

        self._token_bytes = list(token_bytes)
        if len(set(self._token_bytes)) != len(self._token_bytes):
            raise ValueError("duplicate tokens in the vocabulary")
        if sorted(self._token_bytes[:256]) != [bytes([b]) for b in range(256)]:
            raise ValueError("the first 256 tokens must be the 256 single bytes")
        self.pattern = pattern
        self.trained_on = dict(trained_on or {})
        n_learned = len(self._token_bytes)
        self._special_ids = {name: n_learned + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            name="nanochat",
            pat_str=pattern,
            mergeable_ranks={token: rank for rank, token in enumerate(self._token_bytes)},
            special_tokens=self._special_ids,
        )

    # --- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Learned tokens + special tokens: the size of the model's embedding table."""
        return len(self._token_bytes) + len(SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        """The id of a special token, e.g. ``special_id("<|user_start|>")``."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self._token_bytes)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token gives its name, e.g. b"<|bos|>")."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside [0, {self.vocab_size})")
        if self.is_special(token_id):
            return SPECIAL_TOKENS[token_id - len(self._token_bytes)].encode("utf-8")
        return self._token_bytes[token_id]

    def token_byte_lengths(self) -> list[int]:
        """Bytes of text per id, 0 for specials: the denominator of bits per byte."""
        return [len(token) for token in self._token_bytes] + [0] * len(SPECIAL_TOKENS)

    # --- encoding -----------------------------------------------------------------------

    def _resolve(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.special_id(token)
        if isinstance(token, int) and 0 <= token < self.vocab_size:
            return token
        raise ValueError(f"expected a token id or a special token name, got {token!r}")

    def encode(
        self,
        text: str | Sequence[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode one string to ids, or a list of strings to a list of id lists (in parallel).

        ``prepend``/``append`` add one token (an id or a special token name) to each
        sequence, e.g. ``prepend="<|bos|>"``. Special-token text inside ``text`` is encoded
        as ordinary text.
        """
        head = [] if prepend is None else [self._resolve(prepend)]
        tail = [] if append is None else [self._resolve(append)]
        if isinstance(text, str):
            return head + self._encoding.encode_ordinary(text) + tail
        if not all(isinstance(t, str) for t in text):
            raise TypeError("encode takes a string or a list of strings")
        batch = self._encoding.encode_ordinary_batch(list(text), num_threads=num_threads)
        return [head + ids + tail for ids in batch]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text; bytes that do not form valid UTF-8 become U+FFFD."""
        return self._encoding.decode(list(ids))

    # --- files --------------------------------------------------------------------------

    def save(self, directory: Path) -> Path:
        """Write the three files (tokenizer.json last, with the others' hashes) into
        ``directory``; returns it."""
        directory = Path(directory)
        merges = b"".join(
            base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n"
            for rank, token in enumerate(self._token_bytes)
        )
        lengths = json.dumps(self.token_byte_lengths())
        atomic_write_bytes(directory / MERGES_FILE, merges)
        atomic_write_text(directory / TOKEN_BYTES_FILE, lengths)
        meta = {
            "format": FORMAT_VERSION,
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": dict(self._special_ids),
            "trained_on": self.trained_on,
            "files": {
                MERGES_FILE: _file_record(merges),
                TOKEN_BYTES_FILE: _file_record(lengths.encode("utf-8")),
            },
        }
        meta["sha256"] = _meta_sha256(meta)
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Read a tokenizer written by ``save``.

        Raises FileNotFoundError (with the fix) when the folder is missing or incomplete,
        TokenizerError (an ArtifactError: one line naming the file and the fix) when a file is
        damaged, malformed, or the files disagree with each other.
        """
        directory = Path(directory)
        missing = [
            name
            for name in (META_FILE, MERGES_FILE, TOKEN_BYTES_FILE)
            if not (directory / name).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"no complete tokenizer in {directory} (missing {', '.join(missing)}): "
                "run `make tokenizer` first"
            )
        meta = _read_meta(directory / META_FILE)
        data = {name: _read_bytes(directory / name) for name in (MERGES_FILE, TOKEN_BYTES_FILE)}
        _check_hashes(directory, meta, data)
        try:
            token_bytes = _parse_merges(data[MERGES_FILE])
        except ValueError as exc:
            raise TokenizerError(f"{directory / MERGES_FILE}: {one_line(exc)}; {FIX}") from None
        try:
            tokenizer = cls(token_bytes, pattern=meta["pattern"], trained_on=meta["trained_on"])
        except (ValueError, TypeError) as exc:  # a vocabulary or pattern tiktoken refuses
            raise TokenizerError(f"the tokenizer in {directory}: {one_line(exc)}; {FIX}") from None
        try:
            lengths = json.loads(data[TOKEN_BYTES_FILE])
        except ValueError as exc:
            raise TokenizerError(
                f"{directory / TOKEN_BYTES_FILE} is not valid JSON ({one_line(exc)}); {FIX}"
            ) from None
        if (
            meta["vocab_size"] != tokenizer.vocab_size
            or meta["special_tokens"] != tokenizer._special_ids
            or lengths != tokenizer.token_byte_lengths()
        ):
            raise TokenizerError(f"the files in {directory} disagree with each other; {FIX}")
        return tokenizer

    # --- chat ---------------------------------------------------------------------------

    def render_conversation(
        self, conversation: Mapping, max_tokens: int = SEQ_LEN
    ) -> tuple[list[int], list[int]]:
        """A conversation as ``(ids, mask)``, cut to ``max_tokens``; mask 1 = train on it.

        BOS; each user turn ``user_start text user_end`` (mask 0); each assistant turn
        ``assistant_start`` (0), its text (1), ``assistant_end`` (1), where a python part is
        ``python_start code python_end`` (1) and a python_output part ``output_start output
        output_end`` (0: the tool produced it, not the model). A leading system message is
        merged into the first user message. Raises ValueError on a malformed conversation.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids, mask = self._render(check_conversation(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: Mapping) -> list[int]:
        """The prompt for generating the last assistant turn: the conversation without its
        final assistant message (which must be last), ending with ``assistant_start``."""
        messages = check_conversation(conversation)
        if messages[-1][0] != "assistant":
            raise ValueError("render_for_completion needs a conversation ending with assistant")
        ids, _ = self._render(messages[:-1])
        return ids + [self.special_id("<|assistant_start|>")]

    def _render(self, messages: list[tuple[str, list[tuple[str, str]]]]):
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], supervised: int) -> None:
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        sid = self.special_id
        add([self.bos_id], 0)
        for role, parts in messages:
            if role == "user":
                add([sid("<|user_start|>")], 0)
                add(self.encode(parts[0][1]), 0)
                add([sid("<|user_end|>")], 0)
                continue
            add([sid("<|assistant_start|>")], 0)
            for kind, text in parts:
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add(self.encode(text, prepend="<|python_start|>", append="<|python_end|>"), 1)
                else:  # python_output
                    add(self.encode(text, prepend="<|output_start|>", append="<|output_end|>"), 0)
            add([sid("<|assistant_end|>")], 1)
        return ids, mask

    def visualize(self, ids: Sequence[int], mask: Sequence[int]) -> str:
        """Debug view of a rendered conversation: supervised tokens (mask 1) in green,
        the rest in grey, tokens separated by ``|`` (ANSI colours)."""
        colours = {0: "\033[90m", 1: "\033[92m"}
        pieces = [
            colours[m] + self.id_to_bytes(i).decode("utf-8", errors="replace")
            for i, m in zip(ids, mask, strict=True)
        ]
        return "\033[0m|".join(pieces) + "\033[0m"


PART_TYPES = ("text", "python", "python_output")


def check_conversation(conversation: Mapping) -> list[tuple[str, list[tuple[str, str]]]]:
    """Validate a conversation; return ``[(role, [(part_type, text), ...]), ...]`` with the
    system message merged into the first user message and every user turn as one text part."""
    messages = conversation.get("messages") if isinstance(conversation, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation is {"messages": [...]} with at least one message')
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {message['role']!r}")

    checked: list[tuple[str, list[tuple[str, str]]]] = []
    system = None
    if messages[0]["role"] == "system":
        system = _text_content(messages[0], 0)
        messages = messages[1:]
        if not messages:
            raise ValueError("a system message must be followed by a user message")
    offset = 0 if system is None else 1  # so errors name the caller's own message index
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"message {i + offset}: expected role {expected!r}, got {message['role']!r} "
                "(roles must alternate user/assistant, starting with user; "
                "a system message may only come first)"
            )
        if expected == "user":
            text = _text_content(message, i + offset)
            if system is not None:
                text, system = f"{system}\n\n{text}", None
            checked.append(("user", [("text", text)]))
        else:
            checked.append(("assistant", _assistant_parts(message["content"], i + offset)))
    return checked


def _text_content(message: Mapping, index: int) -> str:
    if not isinstance(message["content"], str):
        raise ValueError(f"message {index}: {message['role']} content must be a string")
    return message["content"]


def _assistant_parts(content: object, index: int) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError(f"message {index}: assistant content must be a string or a list")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in PART_TYPES:
            raise ValueError(
                f"message {index}: unknown part type {kind!r} (expected one of {PART_TYPES})"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}: a {kind} part needs a string 'text'")
        parts.append((kind, part["text"]))
    return parts


# --- file checks ----------------------------------------------------------------------------

# (type, what the message calls it) of every key tokenizer.json must have; trained_on may
# be null (free metadata), files and sha256 are absent in tokenizers saved before them.
_META_KEYS = {
    "format": (int, "an integer"),
    "pattern": (str, "a string"),
    "vocab_size": (int, "an integer"),
    "special_tokens": (dict, "an object"),
}
_noted_unhashed: set[Path] = set()  # folders whose missing hashes were mentioned once


def _file_record(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _meta_sha256(meta: Mapping) -> str:
    """The sha256 of tokenizer.json's content (its own "sha256" key left out), over a
    canonical serialisation: re-indenting the file keeps it, changing a value does not."""
    body = {key: value for key, value in meta.items() if key != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"{path} cannot be read ({exc.strerror}); {FIX}") from None


def _read_meta(path: Path) -> dict:
    """tokenizer.json parsed and its keys type-checked; TokenizerError otherwise."""
    try:
        meta = json.loads(_read_bytes(path))
    except ValueError as exc:  # bad JSON, or bytes that are not UTF-8
        raise TokenizerError(f"{path} is not valid JSON ({one_line(exc)}); {FIX}") from None
    if not isinstance(meta, dict):
        raise TokenizerError(f"{path} holds a JSON {type(meta).__name__}, not an object; {FIX}")
    if meta.get("format") != FORMAT_VERSION:
        raise TokenizerError(f"{path} is not a format-{FORMAT_VERSION} tokenizer file; {FIX}")
    for key, (kind, words) in _META_KEYS.items():
        if key not in meta:
            raise TokenizerError(f"{path} has no {key!r}; {FIX}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise TokenizerError(f"{path}: {key!r} is not {words}; {FIX}")
    if meta.get("trained_on") is None:
        meta["trained_on"] = {}
    elif not isinstance(meta["trained_on"], dict):
        raise TokenizerError(f"{path}: 'trained_on' is not an object; {FIX}")
    return meta


def _check_hashes(directory: Path, meta: dict, data: dict[str, bytes]) -> None:
    """Compare tokenizer.json's own hash and the other files' recorded sizes and hashes."""
    path = directory / META_FILE
    if "files" not in meta and "sha256" not in meta:
        if directory not in _noted_unhashed:  # saved before the hashes existed: still usable
            _noted_unhashed.add(directory)
            log(
                f"note: {path} records no hashes (saved by an older nanochat), so its files "
                "cannot be checked; `make tokenizer` saves a tokenizer with them"
            )
        return
    files = meta.get("files")
    if not isinstance(meta.get("sha256"), str) or not isinstance(files, dict):
        raise TokenizerError(f"{path}: its 'files' or 'sha256' entry is malformed; {FIX}")
    if _meta_sha256(meta) != meta["sha256"]:
        raise TokenizerError(f"{path} was changed after it was saved (its sha256 differs); {FIX}")
    for name, content in data.items():
        if files.get(name) != _file_record(content):
            raise TokenizerError(
                f"{directory / name} does not match the size and sha256 recorded in "
                f"{META_FILE} (damaged or edited); {FIX}"
            )


def _parse_merges(data: bytes) -> list[bytes]:
    """Tokens in rank order from tiktoken's text format (ranks must run 0, 1, 2, ...)."""
    tokens = []
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            encoded, rank = line.split(b" ")
            token, rank = base64.b64decode(encoded, validate=True), int(rank)
        except ValueError as exc:
            raise ValueError(f"line {line_no} is malformed: {line[:80]!r}") from exc
        if rank != len(tokens):
            raise ValueError(f"line {line_no}: rank {rank}, expected {len(tokens)}")
        tokens.append(token)
    return tokens
