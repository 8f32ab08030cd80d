"""Stage chat-eval: score a chat checkpoint on ARC, MMLU, GSM8K, HumanEval (and SpellingBee).

    python -m scripts.chat_eval -i sft                              # every task, hub data
    python -m scripts.chat_eval -i base -a ARC-Easy GSM8K --max-problems 8 --tasks embedded
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

How each task is scored, and ChatCORE (mean centered accuracy), are in
nanochat/evaluation/chat_eval.py.

Writes the report section ``report/chat-eval-<source>.md`` (+ ``.json`` with the metrics for
the report card's column of that source). Under torchrun each rank scores problems
``rank::world`` of every task and the counts are summed over ranks; rank 0 writes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nanochat.common import (
    CliParser,
    add_checkpoint_arguments,
    base_dir,
    log,
    non_negative_float,
    positive_int,
    run_main,
)
from nanochat.evaluation.chat_eval import (
    REPORT_METRICS,
    TASK_NAMES,
    TaskScore,
    chatcore,
    load_tasks,
    parse_task_names,
    score_tasks,
)

# --- the stage ------------------------------------------------------------------------------


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.chat_eval",
        description="Evaluate a chat checkpoint: ARC, MMLU, GSM8K, HumanEval, ChatCORE "
        "(stage chat-eval).",
    )
    add_checkpoint_arguments(parser)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_dir()
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

    from nanochat import runtime

    rt = runtime.start()
    try:
        return evaluate(args, base, loaded, rt)
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
