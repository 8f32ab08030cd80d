"""The CORE metric (DCLM): in-context accuracy on a set of tasks, centered on chance.

Three task types, all scored from one forward pass of the model (no sampling):

- multiple choice: one context, k continuations (the choices); the prediction is the choice
  whose continuation tokens have the lowest mean cross-entropy;
- schema: k contexts, one continuation; the prediction is the context under which the shared
  continuation has the lowest mean cross-entropy;
- language modelling: one context and its continuation; correct when greedy decoding (the
  argmax at every position) reproduces every continuation token.

Prompts: ``num_fewshot`` other examples of the same task (drawn with a seed fixed per
example, so every run and every rank renders the same prompt), each written out with its
gold answer and followed by a blank line, then the example itself; context and continuation
are joined by the task's ``continuation_delimiter``. Token spans: each row is the BOS token +
the full text. The continuation starts where the row's tokens stop agreeing with the tokens of
the context alone (so a token that merges across the boundary counts as continuation); for
schema tasks, the final tokens all k rows share. A row longer than the model's context is
cropped from the left. The k rows are padded on the right and run as one batch.

centered = (accuracy - baseline) / (1 - baseline), with the random baseline a fraction
(eval_meta_data.csv gives percents); CORE = the mean of the centered accuracies. Under
torchrun, rank r evaluates examples r, r + W, ... and the counts are all-reduced.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.evaluation.eval_bundle import (
    Bundle,
    Example,
    LMExample,
    MCExample,
    SchemaExample,
    TaskSpec,
)

FEWSHOT_SEED = 1234  # few-shot examples of example i: random.Random(FEWSHOT_SEED + i)
ORDER_SEED = 1337  # the evaluation order, so --max-per-task takes a fixed random subset
EXAMPLE_SEPARATOR = "\n\n"  # after each few-shot example

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) -> logits (B, T, V)


# ----------------------------------------------------------------------------- prompts


def fewshot_examples(examples: Sequence[Example], index: int, num_fewshot: int) -> list[Example]:
    """``num_fewshot`` examples other than ``index``, the same on every call and every rank
    (fewer when the task has fewer other examples)."""
    if num_fewshot <= 0:
        return []
    pool = [i for i in range(len(examples)) if i != index]
    rng = random.Random(FEWSHOT_SEED + index)
    return [examples[i] for i in rng.sample(pool, min(num_fewshot, len(pool)))]


def _shot(example: Example, delimiter: str) -> str:
    """A few-shot example written out with its gold answer."""
    if isinstance(example, MCExample):
        return example.query + delimiter + example.choices[example.gold]
    if isinstance(example, SchemaExample):
        return example.context_options[example.gold] + delimiter + example.continuation
    return example.context.strip() + delimiter + example.continuation


def render(example: Example, fewshot: Sequence[Example], delimiter: str) -> list[tuple[str, str]]:
    """(context, full text) per row: one row per choice (multiple choice) or per context
    option (schema), one row for language modelling. ``full = context + continuation``."""
    prefix = "".join(_shot(shot, delimiter) + EXAMPLE_SEPARATOR for shot in fewshot)
    if isinstance(example, MCExample):
        context = prefix + example.query + delimiter
        return [(context, context + choice) for choice in example.choices]
    if isinstance(example, SchemaExample):
        rows = []
        for option in example.context_options:
            context = prefix + option + delimiter
            rows.append((context, context + example.continuation))
        return rows
    if isinstance(example, LMExample):
        # Contexts in the wild carry stray trailing whitespace (DCLM's LM files do): trimmed,
        # so the delimiter alone separates context and continuation.
        context = prefix + example.context.strip() + delimiter
        return [(context, context + example.continuation)]
    raise TypeError(f"not an example: {example!r}")


# ----------------------------------------------------------------------------- tokens


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def common_suffix(rows: Sequence[Sequence[int]]) -> int:
    """How many final tokens all rows share."""
    n = min(len(r) for r in rows)
    for i in range(1, n + 1):
        token = rows[0][-i]
        if any(r[-i] != token for r in rows[1:]):
            return i - 1
    return n


@dataclass(frozen=True)
class Prepared:
    """One example, tokenized: per row, the ids and the span [start, end) of the
    continuation tokens that are scored (start >= 1: each is predicted from the one before)."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]


def prepare(
    tokenizer,
    example: Example,
    fewshot: Sequence[Example],
    delimiter: str,
    max_seq_len: int | None = None,
) -> Prepared:
    """Render and tokenize one example (BOS first) and find its continuation tokens."""
    pairs = render(example, fewshot, delimiter)
    contexts = list(dict.fromkeys(context for context, _ in pairs))  # MC: a single context
    encoded = tokenizer.encode(contexts + [full for _, full in pairs], prepend=tokenizer.bos_id)
    context_ids = dict(zip(contexts, encoded[: len(contexts)], strict=True))
    rows = [list(ids) for ids in encoded[len(contexts) :]]
    ends = [len(row) for row in rows]
    starts = [
        common_prefix(context_ids[context], row)
        for (context, _), row in zip(pairs, rows, strict=True)
    ]
    if isinstance(example, SchemaExample):
        # The continuation is shared: score the same final tokens in every row, as many as
        # all rows agree on and no more than any row's own continuation (a context token
        # that merges with the continuation differently per row leaves the rows' own spans).
        shared = min(
            common_suffix(rows), *(end - start for start, end in zip(starts, ends, strict=True))
        )
        if shared > 0:
            starts = [end - shared for end in ends]
    if any(start >= end for start, end in zip(starts, ends, strict=True)):
        raise ValueError(f"an empty continuation in {example!r}")
    if max_seq_len is not None:
        rows, starts, ends = _crop_left(rows, starts, ends, max_seq_len)
    return Prepared(rows, starts, ends)


def _crop_left(rows, starts, ends, max_len: int):
    """Drop tokens from the left of rows longer than ``max_len``; spans shift with them.
    A continuation longer than the window keeps its last max_len - 1 tokens scored."""
    if max_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_len}")
    out_rows, out_starts, out_ends = [], [], []
    for row, start, end in zip(rows, starts, ends, strict=True):
        crop = max(0, len(row) - max_len)
        out_rows.append(row[crop:])
        out_starts.append(max(start - crop, 1))
        out_ends.append(end - crop)
    return out_rows, out_starts, out_ends


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """(B, T) ids, rows padded on the right (the padding is never scored)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids.to(device)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model_fn: ModelFn, prepared: Prepared, pad_id: int, device) -> torch.Tensor:
    """Mean cross-entropy (nats) of each row's continuation tokens, shape (rows,)."""
    ids = pad_rows(prepared.rows, pad_id, device)
    logits = model_fn(ids)  # (B, T, V)
    losses = []
    for i, (start, end) in enumerate(zip(prepared.starts, prepared.ends, strict=True)):
        # logits at position t predict token t + 1
        span = logits[i, start - 1 : end - 1].float()  # (n, V)
        losses.append(F.cross_entropy(span, ids[i, start:end], reduction="mean"))
    return torch.stack(losses)


@torch.no_grad()
def greedy_matches(model_fn: ModelFn, prepared: Prepared, pad_id: int, device) -> bool:
    """True when the argmax at every continuation position is the continuation token."""
    ids = pad_rows(prepared.rows, pad_id, device)
    logits = model_fn(ids)  # (1, T, V)
    start, end = prepared.starts[0], prepared.ends[0]
    predicted = logits[0, start - 1 : end - 1].argmax(dim=-1)
    return bool(torch.equal(predicted, ids[0, start:end]))


def evaluate_example(
    model_fn: ModelFn,
    tokenizer,
    examples: Sequence[Example],
    index: int,
    task: TaskSpec,
    device,
    max_seq_len: int | None = None,
) -> bool:
    """Whether the model gets ``examples[index]`` right."""
    example = examples[index]
    fewshot = fewshot_examples(examples, index, task.num_fewshot)
    prepared = prepare(tokenizer, example, fewshot, task.continuation_delimiter, max_seq_len)
    pad_id = tokenizer.bos_id
    if isinstance(example, LMExample):
        return greedy_matches(model_fn, prepared, pad_id, device)
    losses = score(model_fn, prepared, pad_id, device)
    return int(torch.argmin(losses).item()) == example.gold  # ties: the first option


def evaluation_order(n: int, max_examples: int | None = None) -> list[int]:
    """Example indices in a fixed shuffled order, cut to ``max_examples``: a small run
    evaluates a random subset, the same one every time."""
    order = list(range(n))
    random.Random(ORDER_SEED).shuffle(order)
    return order if max_examples is None else order[:max_examples]


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(
    model_fn: ModelFn,
    tokenizer,
    examples: Sequence[Example],
    task_meta: TaskSpec,
    device,
    max_examples: int | None = None,
    *,
    max_seq_len: int | None = None,
) -> float:
    """Accuracy of ``model_fn`` on a task's examples (all of them, or ``max_examples`` in
    the fixed order). Few-shot examples come from the whole list either way.

    ``model_fn(ids (B, T)) -> logits (B, T, V)``; ``tokenizer`` needs ``encode(texts,
    prepend=id)`` and ``bos_id``. Under torch.distributed each rank takes every W-th example
    and the counts are summed over ranks, so every rank returns the same accuracy.
    """
    if not examples:
        raise ValueError(f"task {task_meta.label!r} has no examples")
    rank, world_size = _dist_info()
    order = evaluation_order(len(examples), max_examples)
    correct = total = 0
    for index in order[rank::world_size]:
        correct += evaluate_example(
            model_fn, tokenizer, examples, index, task_meta, device, max_seq_len
        )
        total += 1
    if world_size > 1:
        counts = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        correct, total = (int(v) for v in counts.tolist())
    return correct / total


# ----------------------------------------------------------------------------- CORE


def centered_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """0 at chance, 1 when perfect: (acc - b) / (1 - b) with b = baseline / 100."""
    baseline = random_baseline_percent / 100.0
    return (accuracy - baseline) / (1.0 - baseline)


def core_score(centered: Sequence[float]) -> float:
    """The CORE metric: the mean of the tasks' centered accuracies."""
    if not centered:
        raise ValueError("no tasks")
    return sum(centered) / len(centered)


@dataclass(frozen=True)
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    examples: int  # how many were evaluated
    accuracy: float
    random_baseline: float  # percent
    centered: float
    seconds: float


@dataclass(frozen=True)
class CoreResult:
    tasks: tuple[TaskResult, ...]
    core: float


def evaluate_core(
    model_fn: ModelFn,
    tokenizer,
    bundle: Bundle,
    device,
    max_per_task: int | None = None,
    *,
    max_seq_len: int | None = None,
    on_task: Callable[[TaskResult], None] | None = None,
) -> CoreResult:
    """Every task of ``bundle`` in order; ``on_task`` sees each result as it lands."""
    results = []
    for task in bundle.tasks:
        start = time.monotonic()
        examples = bundle.examples(task)
        accuracy = evaluate_task(
            model_fn, tokenizer, examples, task, device, max_per_task, max_seq_len=max_seq_len
        )
        result = TaskResult(
            label=task.label,
            task_type=task.task_type,
            num_fewshot=task.num_fewshot,
            examples=len(examples) if max_per_task is None else min(len(examples), max_per_task),
            accuracy=accuracy,
            random_baseline=task.random_baseline,
            centered=centered_accuracy(accuracy, task.random_baseline),
            seconds=time.monotonic() - start,
        )
        results.append(result)
        if on_task is not None:
            on_task(result)
    return CoreResult(tuple(results), core_score([r.centered for r in results]))
