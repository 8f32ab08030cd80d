"""Chat evaluation: score a chat model on ARC, MMLU, GSM8K, HumanEval and SpellingBee.

As in the recipe: ARC-Easy, ARC-Challenge and MMLU are categorical: the conversation is rendered up
to the assistant start, one forward pass, and the logits at the last position restricted to
the item's choice letters pick the answer. GSM8K, HumanEval and SpellingBee are generative: a
greedy reply (``Engine.generate_batch``) is decoded and judged by ``task.evaluate``.
ChatCORE = mean over the tasks run of the centered accuracy (acc - baseline) / (1 - baseline),
baseline 0.25 for the multiple-choice tasks and 0 for the generative ones. Under torchrun each
rank scores problems ``rank::world`` of every task and the counts are summed over ranks.

Used by the chat-eval stage (scripts/chat_eval.py) and by SFT's periodic ChatCORE subset
(scripts/chat_sft.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat.common import UsageError, one_line

TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
REPORT_METRICS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
CATEGORICAL_BASELINE = 0.25  # four options: the chance accuracy of the multiple-choice tasks


@dataclass
class TaskScore:
    name: str
    eval_type: str
    correct: int
    total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def baseline(self) -> float:
        return CATEGORICAL_BASELINE if self.eval_type == "categorical" else 0.0


def centered(accuracy: float, baseline: float) -> float:
    """(accuracy - baseline) / (1 - baseline): 0 at chance, 1 when every answer is right."""
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(scores: list[TaskScore]) -> float:
    """Mean centered accuracy over the tasks scored."""
    if not scores:
        raise ValueError("ChatCORE needs at least one task")
    return sum(centered(s.accuracy, s.baseline) for s in scores) / len(scores)


def parse_task_names(given: list[str] | None) -> list[str]:
    """The tasks asked for ("ARC-Easy GSM8K" or "ARC-Easy|GSM8K", any case), in order, once
    each; UsageError naming the unknown one."""
    if not given:
        return list(TASK_NAMES)
    by_lower = {name.lower(): name for name in TASK_NAMES}
    names: list[str] = []
    for item in given:
        for part in item.replace(",", "|").split("|"):
            part = part.strip()
            if not part:
                continue
            name = by_lower.get(part.lower())
            if name is None:
                raise UsageError(f"unknown task {part!r}; choose from: {', '.join(TASK_NAMES)}")
            if name not in names:
                names.append(name)
    if not names:
        raise UsageError(f"no task given; choose from: {', '.join(TASK_NAMES)}")
    return names


def build_task(name: str, source: str):
    """The eval split of one task. SpellingBee exists only embedded (it is generated)."""
    from nanochat import tasks

    if name in ("ARC-Easy", "ARC-Challenge"):
        return tasks.ARC(name, source=source, split="test")
    if name == "MMLU":
        return tasks.MMLU("all", source=source)
    if name == "GSM8K":
        return tasks.GSM8K(source=source, split="test")
    if name == "HumanEval":
        return tasks.HumanEval(source=source)
    if name == "SpellingBee":
        return tasks.SpellingBee(source="embedded", n=200, seed=1)  # seed 0 is the training mix
    raise UsageError(f"unknown task {name!r}")


def load_tasks(names: list[str], source: str, max_problems: int | None) -> dict:
    from nanochat.tasks import TaskSlice

    loaded = {}
    for name in names:
        try:
            task = build_task(name, source)
        except FileNotFoundError as exc:
            raise UsageError(
                f"{name}: hub data missing: {one_line(exc)}; `--tasks=embedded` works offline"
            ) from None
        except ValueError as exc:
            raise UsageError(f"{name}: {one_line(exc)}") from None
        if max_problems is not None:
            task = TaskSlice(task, 0, max_problems)
        loaded[name] = task
    return loaded


# --- scoring --------------------------------------------------------------------------------


def letter_ids(tokenizer, letters: list[str]) -> list[int]:
    """One token id per answer letter (how the assistant writes it: the letter alone)."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise UsageError(f"answer letter {letter!r} is not a single token ({encoded})")
        ids.append(encoded[0])
    return ids


def score_categorical(
    model, tokenizer, task, indices, batch_size: int, device, max_len: int | None = None
) -> tuple[int, int]:
    """(correct, total) over ``task[i] for i in indices``: argmax of the last-position logits
    restricted to the item's letters. Prompts of similar length are batched, padded on the
    right (the model is causal, so padding never reaches a row's last real position); a prompt
    longer than ``max_len`` keeps its last ``max_len`` tokens."""
    import torch

    items = []
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        if max_len is not None and len(prompt) > max_len:
            prompt = prompt[-max_len:]
        letters = task.letters(i)
        answer = conversation["messages"][-1]["content"]
        items.append((prompt, letter_ids(tokenizer, letters), letters.index(answer)))
    items.sort(key=lambda item: len(item[0]))
    correct = 0
    pad = tokenizer.bos_id
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(prompt) for prompt, _, _ in chunk)
        rows = [prompt + [pad] * (width - len(prompt)) for prompt, _, _ in chunk]
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(ids)
        for row, (prompt, choice_ids, answer) in enumerate(chunk):
            last = logits[row, len(prompt) - 1]
            restricted = last[torch.tensor(choice_ids, device=last.device)]
            correct += int(int(restricted.argmax().item()) == answer)
    return correct, len(items)


def score_generative(
    engine, tokenizer, task, indices, max_new_tokens: int, temperature: float
) -> tuple[int, int]:
    """(correct, total): one reply per problem, decoded and judged by ``task.evaluate``. A
    prompt that leaves no room in the model's context counts as wrong."""
    correct = total = 0
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        total += 1
        if len(prompt) >= engine.max_context:
            continue
        replies, _ = engine.generate_batch(
            prompt, 1, max_tokens=max_new_tokens, temperature=temperature, seed=i
        )
        correct += int(bool(task.evaluate(conversation, tokenizer.decode(replies[0]))))
    return correct, total


def all_reduce_counts(correct: int, total: int, rt) -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return correct, total
    counts = torch.tensor([correct, total], dtype=torch.long, device=rt.device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0].item()), int(counts[1].item())


def score_tasks(
    model,
    tokenizer,
    loaded: dict,
    rt,
    batch: int,
    max_new_tokens: int,
    temperature: float,
    on_score=None,
) -> list[TaskScore]:
    """A TaskScore per task of ``loaded`` (name -> task): each rank scores problems
    ``rank::world`` and the counts are summed over ranks, so every rank must call this.
    ``model`` is the plain (uncompiled) GPT, in eval mode; ``on_score(score)`` runs after each
    task. Used by the chat-eval stage and by SFT's ChatCORE subset (scripts.chat_sft)."""
    from nanochat.inference.engine import Engine

    engine = Engine(model, tokenizer)
    max_len = model.config.sequence_len
    scores: list[TaskScore] = []
    for name, task in loaded.items():
        t0 = time.monotonic()
        indices = range(rt.rank, len(task), rt.world_size)
        with rt.autocast():
            if task.eval_type == "categorical":
                correct, total = score_categorical(
                    model, tokenizer, task, indices, batch, rt.device, max_len
                )
            else:
                correct, total = score_generative(
                    engine, tokenizer, task, indices, max_new_tokens, temperature
                )
        correct, total = all_reduce_counts(correct, total, rt)
        score = TaskScore(name, task.eval_type, correct, total, time.monotonic() - t0)
        scores.append(score)
        if on_score is not None:
            on_score(score)
    return scores
