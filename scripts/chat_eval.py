"""Stage chat-eval: score a chat checkpoint on ARC, MMLU, GSM8K, HumanEval (and SpellingBee).

    python -m scripts.chat_eval -i sft                              # every task, hub data
    python -m scripts.chat_eval -i base -a ARC-Easy GSM8K --max-problems 8 --tasks embedded
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

DESIGN B.6. ARC-Easy, ARC-Challenge and MMLU are categorical: the conversation is rendered up
to the assistant start, one forward pass, and the logits at the last position restricted to
the item's choice letters pick the answer. GSM8K, HumanEval and SpellingBee are generative: a
greedy reply (``Engine.generate_batch``) is decoded and judged by ``task.evaluate``.

ChatCORE = mean over the tasks run of the centered accuracy (acc - baseline) / (1 - baseline),
baseline 0.25 for the multiple-choice tasks and 0 for the generative ones.

Writes the report section ``report/chat-eval-<source>.md`` (+ ``.json`` with the metrics for
the report card's column of that source). Under torchrun each rank scores problems
``rank::world`` of every task and the counts are summed over ranks; rank 0 writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    base_dir,
    die,
    log,
    non_negative_float,
    one_line,
    positive_int,
    run_main,
)

SOURCES = ("base", "mid", "sft", "rl")
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
    task. Used by this stage and by SFT's ChatCORE subset (scripts.chat_sft)."""
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


# --- the stage ------------------------------------------------------------------------------


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.chat_eval",
        description="Evaluate a chat checkpoint: ARC, MMLU, GSM8K, HumanEval, ChatCORE "
        "(stage chat-eval).",
    )
    parser.add_argument(
        "-i",
        "--source",
        default="auto",
        choices=(*SOURCES, "auto"),
        help="which stage's checkpoint (default auto: the newest of rl, sft, mid, base)",
    )
    parser.add_argument(
        "-a",
        "--task-names",
        nargs="+",
        metavar="TASK",
        help=f"tasks to run (default: all): {' '.join(TASK_NAMES)}",
    )
    parser.add_argument(
        "--max-problems", type=positive_int, help="first N problems of each task (default: all)"
    )
    parser.add_argument(
        "--tasks",
        choices=("embedded", "hub"),
        default="hub",
        help="hub: the real datasets from BASE_DIR/task_data (default); embedded: the offline "
        "miniatures",
    )
    parser.add_argument(
        "--batch", type=positive_int, default=8, help="prompts per forward, categorical tasks"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="reply length cap, generative tasks (default: 256)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature for generative tasks (default: 0 = greedy)",
    )
    parser.add_argument("--tag", help="checkpoint folder (default: the most recent one)")
    parser.add_argument("--step", type=positive_int, help="checkpoint step (default: latest)")
    return parser


def _fail(message: str) -> None:
    """One line and exit 2; under torchrun only rank 0 prints it (every rank exits)."""
    if os.environ.get("RANK", "0") == "0":
        die(message)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_dir()
    try:
        names = parse_task_names(args.task_names)
        loaded = load_tasks(names, args.tasks, args.max_problems)
        if "HumanEval" in loaded:  # say which sandbox runs the model's code, before any work
            from nanochat.inference.execution import sandbox_description

            line = sandbox_description()  # a layer asked for and not available: UsageError
            rank = os.environ.get("RANK", "0")
            if rank == "0":
                log(line)
            elif not line.startswith("sandbox: bubblewrap"):  # a rank that fell back says so
                log(f"rank {rank}: {line}")
    except UsageError as exc:
        _fail(str(exc))

    from nanochat import runtime

    rt = runtime.start()
    try:
        return evaluate(args, base, loaded, rt)
    except UsageError as exc:
        _fail(str(exc))
    finally:
        runtime.stop(rt)


def evaluate(args, base: Path, loaded: dict, rt) -> int:
    from nanochat.inference.engine import load_chat_model
    from nanochat.report import write_section

    start = time.monotonic()
    model, tokenizer, meta = load_chat_model(base, args.source, rt.device, args.tag, args.step)
    if rt.master:
        log(
            f"{args.source} checkpoint {meta['tag']} step {meta.get('step', '?')} on "
            f"{rt.device} x{rt.world_size}; {args.tasks} tasks"
        )

    def report(score: TaskScore) -> None:
        if rt.master:
            print(
                f"{score.name}: accuracy {score.accuracy:.4f} ({score.correct}/{score.total}), "
                f"{score.seconds:.1f} s",
                flush=True,
            )

    scores = score_tasks(
        model, tokenizer, loaded, rt, args.batch, args.max_new_tokens, args.temperature, report
    )
    core = chatcore(scores)
    if not rt.master:
        return 0
    print(f"ChatCORE: {core:.4f} (over {len(scores)} tasks)", flush=True)

    metrics = {s.name: s.accuracy for s in scores if s.name in REPORT_METRICS}
    metrics["ChatCORE"] = core
    wall = time.monotonic() - start
    facts: dict[str, object] = {
        "checkpoint": f"{args.source} {meta['tag']} step {meta.get('step', '?')}",
        "task data": args.tasks
        + (" (SpellingBee is always embedded)" if "SpellingBee" in loaded else ""),
        "problems per task": "all" if args.max_problems is None else args.max_problems,
        "max new tokens": args.max_new_tokens,
        "temperature": args.temperature,
    }
    for s in scores:
        facts[s.name] = f"{s.accuracy:.4f} ({s.correct}/{s.total}, {s.seconds:.1f} s)"
    facts["ChatCORE"] = f"{core:.4f} (mean centered accuracy over {len(scores)} tasks)"
    facts["processes"] = rt.world_size
    facts["device"] = str(rt.device)
    facts["seconds"] = f"{wall:.1f}"
    stage = f"chat-eval-{meta.get('source', args.source)}"
    path = write_section(
        base,
        stage,
        f"Chat evaluation ({args.source})",
        facts,
        metrics=metrics,
        wall_seconds=wall,
    )
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
