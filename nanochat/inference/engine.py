"""Inference: load a chat checkpoint and sample from it with a KV cache and the calculator tool.

Every stage that generates text goes through here: the chat CLI (``scripts/chat_cli.py``) and
the web server (``scripts/chat_web.py``) stream replies, the chat evals (GSM8K, HumanEval) and
RL sample batches of answers. Facts from the recipe (upstream nanochat):

- ``load_chat_model`` finds the newest complete checkpoint of a stage (base, mid, sft or rl;
  "auto" = the most trained one available) and rebuilds the GPT from its meta.
- ``Engine.generate`` preallocates a KV cache, runs ONE forward over the prompt with batch 1,
  copies that cache into N sample rows (``KVCache.expand``), then decodes one token per row
  per step: temperature (0 = greedy), top-k and top-p, seeded through a private
  ``torch.Generator``. A row stops at ``<|assistant_end|>`` or ``<|bos|>``; all rows stop at
  ``max_tokens`` or when the sequence fills the model's context (``sequence_len``).
- The calculator tool: when a row closes ``<|python_start|> expr <|python_end|>``, the
  expression is evaluated by ``use_calculator`` (an ``ast`` whitelist, never ``eval``) and
  ``<|output_start|> result <|output_end|>`` is forced into that row (mask 0: not sampled)
  before sampling resumes.
- ``stream_events`` / ``stream_text`` turn one row into text pieces for a UI, never splitting
  a multi-byte UTF-8 character (a byte-level BPE token may end in the middle of one).

Nothing here is global: each ``generate`` call owns its cache, random generator and per-row
tool state, so one Engine per worker thread (or several calls on one Engine) is safe. On CUDA
the forwards run under bf16 autocast (``nanochat.runtime.compute_dtype``), so callers in any
thread get the same precision without setting it up themselves.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import math
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanochat.common import UsageError, one_line

if TYPE_CHECKING:
    from nanochat.model.gpt import GPT
    from nanochat.tokenizer import Tokenizer

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
# ``stream_events`` kind -> the assistant content part that holds it (anything else is text).
TOOL_PART = {"python": "python", "output": "python_output"}


def merge_parts(parts: list[dict], kind: str, text: str) -> None:
    """Append a ``stream_events`` piece to an assistant message's content parts
    (``{"type", "text"}``), merging it into the last part of the same type."""
    part_type = TOOL_PART.get(kind, "text")
    if parts and parts[-1]["type"] == part_type:
        parts[-1]["text"] += text
    elif text:
        parts.append({"type": part_type, "text": text})


# --- loading a checkpoint ------------------------------------------------------------------


def open_chat_checkpoint(
    base: Path,
    source: str = "auto",
    tag: str | None = None,
    step: int | None = None,
    other_flag: str | None = "-i",
    others: tuple[str, ...] | None = None,
):
    """``(found, tokenizer, meta)`` of the checkpoint to chat with, before any model is
    built: ``checkpoint.find`` picks it (``other_flag``/``others``: the hint when there is
    none, see there), ``meta`` is its meta plus ``source``, ``tag`` and ``directory``. Every
    problem is a one-line UsageError saying which stage to run first."""
    from nanochat.tokenizer import Tokenizer, tokenizer_dir
    from nanochat.training import checkpoint

    kinds = checkpoint.KINDS if others is None else others
    source, found = checkpoint.find(base, source, tag, step, other_flag, kinds)
    try:
        tokenizer = Tokenizer.load(tokenizer_dir(base))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(one_line(exc)) from None
    checkpoint.model_config(found, tokenizer.vocab_size)
    meta = {
        **found.meta,
        "source": source,
        "tag": found.directory.name,
        "directory": str(found.directory),
    }
    return found, tokenizer, meta


def load_chat_model(
    base: Path,
    source: str = "auto",
    device="cpu",
    tag: str | None = None,
    step: int | None = None,
    other_flag: str | None = "-i",
    others: tuple[str, ...] | None = None,
) -> tuple[GPT, Tokenizer, dict]:
    """``(model, tokenizer, meta)`` for chatting: the GPT in eval mode on ``device``, from
    the checkpoint ``open_chat_checkpoint`` picks (``source`` is base | mid | sft | rl | auto;
    ``tag`` and ``step`` default to the newest complete one)."""
    from nanochat.training import checkpoint

    found, tokenizer, meta = open_chat_checkpoint(base, source, tag, step, other_flag, others)
    return checkpoint.load_model(found, device, tokenizer.vocab_size), tokenizer, meta


# --- the calculator tool -------------------------------------------------------------------

MAX_EXPR_CHARS = 256  # bounds the work: no power operator, so ~this many digits at most
_ARITHMETIC = re.compile(r"^[0-9+\-*/(). ]+$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,000" -> "1000"
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
_UNARY = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}


class _Rejected(Exception):
    """The expression uses something outside the whitelist."""


def _string(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    raise _Rejected


def _evaluate(node: ast.AST):
    """Walk the whitelist: numbers, + - * /, unary +/-, and 'literal'.count('literal')."""
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):  # not bool, complex or str
            return node.value
        raise _Rejected
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and len(node.args) == 1
        and not node.keywords
    ):
        return _string(node.func.value).count(_string(node.args[0]))
    raise _Rejected


def _format_number(value) -> str | None:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return None
    value = round(value, 10)  # 0.1+0.2 -> 0.3
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # 48/2 -> "24", as GSM8K writes it
    return repr(value)


def use_calculator(expr: str) -> str | None:
    """The result of a calculator expression as text, or None when it is not allowed.

    Allowed: numbers (an optional thousands comma is dropped), ``+ - * /``, parentheses,
    unary signs and spaces; or ``'literal'.count('literal')`` (the spelling task), which
    may also take part in arithmetic. Everything else (names, attributes, other calls,
    ``**``, ``//``, ``%``, lambdas, comprehensions, ...) gives None, as do errors such as a
    division by zero and results that are not finite. The expression is parsed with ``ast``
    and walked against a whitelist; nothing is ever passed to ``eval``. Without a power
    operator the work is bounded by the length limit (MAX_EXPR_CHARS), so no timer is needed
    and the function is safe in any thread.
    """
    if not isinstance(expr, str):
        return None
    expr = _THOUSANDS.sub("", expr.strip())
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    if not _ARITHMETIC.match(expr) and ".count(" not in expr:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        return _format_number(_evaluate(tree.body))
    except (_Rejected, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


# --- sampling ------------------------------------------------------------------------------


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token id per row of (B, vocab) logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the likelier tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Row:
    """One sample row's state: done, the tool call being written, tokens to force next."""

    done: bool = False
    last: int = -1
    python: list[int] | None = None  # the expression's tokens while inside a python block
    forced: deque = field(default_factory=deque)


class Engine:
    """Generation from one model: KV cache, sampling, the calculator tool, streaming."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, stop: bool = True) -> None:
        """``stop=False`` never ends a row early (benchmarks time a fixed number of tokens)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = model.config.sequence_len  # prompt + reply, in tokens
        sid = tokenizer.special_id
        self.stop_ids = frozenset(sid(name) for name in STOP_TOKENS) if stop else frozenset()
        self.python_start = sid("<|python_start|>")
        self.python_end = sid("<|python_end|>")
        self.output_start = sid("<|output_start|>")
        self.output_end = sid("<|output_end|>")
        self._kinds = {
            self.python_start: "python",
            self.python_end: "text",
            self.output_start: "output",
            self.output_end: "text",
        }

    # --- the core loop -----------------------------------------------------------------

    def generate(
        self,
        tokens: Sequence[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Continue ``tokens`` in ``num_samples`` rows; per step yield (tokens, masks), one
        entry per row: mask 1 = sampled, 0 = forced by the calculator tool.

        A row is done after it yields ``<|assistant_end|>`` or ``<|bos|>`` (mask 1); on
        later steps it yields that same terminal token again with mask 0, so callers skip
        done rows. The iterator ends when every row is done, after ``max_tokens`` steps, or
        when prompt + reply fill the model's context (``max_context``). ``temperature`` 0
        is greedy; ``top_k`` None or 0 and ``top_p`` None or 1 switch those filters off.
        Same seed, same arguments -> the same tokens. Raises ValueError on bad arguments,
        e.g. a prompt that leaves no room in the context.
        """
        prompt = [int(t) for t in tokens]
        vocab = self.tokenizer.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty (it should start with <|bos|>)")
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt) >= self.max_context:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens leaves no room in the model's context "
                f"of {self.max_context}"
            )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        steps = min(max_tokens, self.max_context - len(prompt))
        return self._decode(prompt, num_samples, steps, temperature, top_k, top_p, seed)

    def _autocast(self):
        if self.device.type == "cuda":
            from nanochat.runtime import compute_dtype

            dtype = compute_dtype(self.device)
            if dtype != torch.float32:
                return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _cache_dtype(self) -> torch.dtype:
        if self.device.type == "cuda":
            from nanochat.runtime import compute_dtype

            return compute_dtype(self.device)
        return torch.float32

    @torch.no_grad()  # on a generator: applied around each step only, not to the caller
    def _decode(self, prompt, n, steps, temperature, top_k, top_p, seed):
        from nanochat.model.gpt import KVCache

        if steps <= 0:
            return
        generator = torch.Generator(device=self.device).manual_seed(seed)
        # Room for the prompt and every sampled token but the last (which is never fed).
        cache = KVCache.for_config(
            self.model.config,
            batch_size=1,
            max_len=len(prompt) + steps - 1,
            device=self.device,
            dtype=self._cache_dtype(),
        )
        with self._autocast():
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]  # one prefill, batch 1
        if n > 1:
            cache = cache.expand(n)
            logits = logits.expand(n, -1)
        rows = [_Row() for _ in range(n)]
        for step in range(steps):
            sampled = sample_next(logits, generator, temperature, top_k, top_p).tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled, strict=True):
                if row.done:
                    column.append(row.last)
                    masks.append(0)
                    continue
                mask = 1
                if row.forced:
                    token, mask = row.forced.popleft(), 0
                self._advance(row, token)
                column.append(token)
                masks.append(mask)
            yield column, masks
            if step == steps - 1 or all(row.done for row in rows):
                return
            with self._autocast():
                ids = torch.tensor(column, dtype=torch.long, device=self.device).unsqueeze(1)
                logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def _advance(self, row: _Row, token: int) -> None:
        """Update a row's state with its new token; queue the tool's output when due."""
        row.last = token
        if token in self.stop_ids:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            expr = self.tokenizer.decode(row.python)
            row.python = None
            result = use_calculator(expr)
            if result is not None:
                row.forced.extend(
                    [self.output_start, *self.tokenizer.encode(result), self.output_end]
                )
        elif row.python is not None:
            row.python.append(token)

    # --- conveniences ------------------------------------------------------------------

    def generate_batch(
        self, tokens: Sequence[int], num_samples: int = 1, keep_stop: bool = False, **kwargs
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Every row's reply and mask, without the prompt (for evals and RL); tool output is
        included with mask 0. The terminal token is dropped, or kept with mask 1 when
        ``keep_stop`` (RL trains the choice to stop). ``kwargs`` as in generate."""
        replies: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if done[i]:
                    continue
                if token in self.stop_ids and mask == 1:
                    done[i] = True
                    if not keep_stop:
                        continue
                replies[i].append(token)
                masks[i].append(mask)
        return replies, masks

    def stream_events(self, tokens: Sequence[int], **kwargs) -> Iterator[tuple[str, str]]:
        """One reply as (kind, text) pieces while it is generated. kind is "text" (the
        assistant's words), "python" (a calculator expression being written) or "output"
        (the tool's result, forced). Special tokens themselves are not shown. A piece never
        ends inside a UTF-8 character: incomplete bytes wait for the token that completes
        them. ``kwargs`` as in generate (one row; arguments are checked right away)."""
        if kwargs.get("num_samples", 1) != 1:
            raise ValueError("stream_events streams one row: num_samples must be 1")
        kwargs.pop("num_samples", None)
        return self._events(self.generate(tokens, 1, **kwargs))

    def _events(self, steps: Iterator) -> Iterator[tuple[str, str]]:
        kind = "text"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for column, _ in steps:
                token = column[0]
                if token in self.stop_ids:
                    break
                if token in self._kinds:
                    tail = decoder.decode(b"", final=True)  # bytes left over are invalid
                    if tail:
                        yield kind, tail
                    kind = self._kinds[token]
                    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                    continue
                if self.tokenizer.is_special(token):
                    continue  # a turn marker inside a reply: nothing to show
                piece = decoder.decode(self.tokenizer.id_to_bytes(token))
                if piece:
                    yield kind, piece
            tail = decoder.decode(b"", final=True)
            if tail:
                yield kind, tail
        finally:
            steps.close()

    def stream_text(self, tokens: Sequence[int], **kwargs) -> Iterator[str]:
        """Only the "text" pieces of ``stream_events`` (tool calls and results left out)."""
        return self._only_text(self.stream_events(tokens, **kwargs))

    @staticmethod
    def _only_text(events: Iterator[tuple[str, str]]) -> Iterator[str]:
        try:
            for kind, text in events:
                if kind == "text":
                    yield text
        finally:
            events.close()
