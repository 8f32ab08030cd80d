"""Stage 5: supervised finetuning. ``python -m scripts.chat_sft`` (after ``make midtrain``).

Starts from the latest mid checkpoint (``--source=base`` skips midtraining) and trains on the
recipe's SFT mixture (ARC-Easy, ARC-Challenge, GSM8K, SmolTalk, identity and spelling
conversations), one conversation per row, rows padded to the batch's longest, the loss only on
assistant tokens (mask 1). About one epoch by default; the LR (base LRs x ``--lr-scale`` x
``--init-lr-frac``) decays linearly to 0 over the run. A fresh run warm-starts from the source
checkpoint's optimizer moments when they fit (``--warm-start``, see
nanochat/training/chat_stage.py).

Every ``--chatcore-every`` steps (0 = off) and at the end, besides the val loss and bpb (on
assistant tokens): ChatCORE over a fixed subset -- the first ``--chatcore-problems`` of
ARC-Easy, ARC-Challenge, MMLU and GSM8K from ``--tasks`` (GSM8K replies greedy, at most
``--chatcore-max-tokens``), scored with nanochat.evaluation.chat_eval, problems split over
ranks under torchrun -- logged as ``step N: ChatCORE x (ARC-Easy a, ...)``. The last one lands
in report/sft.json as the fact "ChatCORE subset" and the metrics ``chatcore_subset`` and
``chatcore_subset/<task>`` (not the report card's SFT column, which comes from
``chat-eval-sft``).

Logs, checkpoints, resume and SIGTERM (checkpoint, exit 143) work as in every trainer (the one
loop, nanochat/training/train_loop.py). Writes sft_checkpoints/<tag>/ and report/sft.md.
"""

from __future__ import annotations

from nanochat.common import (
    CliParser,
    UsageError,
    base_dir,
    non_negative_int,
    positive_int,
    run_main,
)
from nanochat.training import chat_stage


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.chat_sft", description=__doc__.split("\n\n")[0])
    chat_stage.add_arguments(p, eval_every=100, save_every=500)
    p.add_argument("--source", choices=("mid", "base"), default="mid", help="start from")
    p.add_argument("--source-tag", help="tag of the source checkpoint (default: most recent)")
    p.add_argument(
        "--examples-per-step",
        type=positive_int,
        help="conversations per step (default: one micro-step)",
    )
    p.add_argument("--init-lr-frac", type=float, default=0.02, help="LR fraction to start at")
    p.add_argument(
        "--chatcore-every",
        type=non_negative_int,
        default=200,
        help="ChatCORE on a fixed subset every N steps and at the end (0 = off; default 200)",
    )
    p.add_argument(
        "--chatcore-problems",
        type=positive_int,
        default=20,
        help="the first K problems of each of " + ", ".join(CHATCORE_TASKS) + " (default 20)",
    )
    p.add_argument(
        "--chatcore-max-tokens",
        type=positive_int,
        default=128,
        help="reply length cap for GSM8K in the subset (default 128)",
    )
    return p


CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K")


class ChatCoreSubset:
    """SFT's periodic eval (``ChatStage.extra_eval``): ChatCORE over the first ``problems`` of
    ARC-Easy, ARC-Challenge, MMLU and GSM8K, scored by nanochat.evaluation.chat_eval (greedy
    replies; problems split over ranks, counts summed)."""

    def __init__(self, loaded: dict, every: int, problems: int, max_new_tokens: int):
        self.loaded, self.every = loaded, every
        self.problems, self.max_new_tokens = problems, max_new_tokens

    def __call__(self, model, tokenizer, rt) -> tuple[str, dict, dict]:
        from nanochat.evaluation.chat_eval import chatcore, score_tasks

        scores = score_tasks(model, tokenizer, self.loaded, rt, 8, self.max_new_tokens, 0.0)
        core = chatcore(scores)
        parts = ", ".join(f"{s.name} {s.accuracy:.4f}" for s in scores)
        line = f"ChatCORE {core:.4f} ({parts})"
        counts = ", ".join(f"{s.name} {s.accuracy:.4f} ({s.correct}/{s.total})" for s in scores)
        facts = {"ChatCORE subset": f"{core:.4f} (first {self.problems} problems: {counts})"}
        metrics = {"chatcore_subset": core}
        metrics.update({f"chatcore_subset/{s.name}": s.accuracy for s in scores})
        return line, facts, metrics


def sft_mixture(source: str, seed: int = 0):
    from nanochat.tasks import ARC, GSM8K, Identity, Mixture, SmolTalk, SpellingBee

    return Mixture(
        [
            ARC(subset="ARC-Easy", source=source, split="train"),
            ARC(subset="ARC-Challenge", source=source, split="train"),
            GSM8K(source=source, split="train"),
            SmolTalk(source=source, split="train"),
            Identity(source="embedded"),
            SpellingBee(source="embedded"),
        ],
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.inference.engine import load_chat_model

    base = base_dir()
    if args.source == "mid" and not (base / "mid_checkpoints").is_dir():
        raise UsageError("no mid checkpoint: run make midtrain first (or --source base)")
    model, tokenizer, meta = load_chat_model(
        base, args.source, "cpu", args.source_tag, other_flag="--source", others=("mid", "base")
    )
    try:
        train_task, val_task = chat_stage.split_val(sft_mixture(args.tasks))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{exc} (or use --tasks=embedded)") from None
    extra = None
    if args.chatcore_every:
        from nanochat.evaluation.chat_eval import load_tasks

        loaded = load_tasks(list(CHATCORE_TASKS), args.tasks, args.chatcore_problems)
        extra = ChatCoreSubset(
            loaded, args.chatcore_every, args.chatcore_problems, args.chatcore_max_tokens
        )
    stage = chat_stage.ChatStage(
        name="sft", title="SFT", kind="sft", packed=False, warmdown_frac=1.0,
        lr_frac=args.init_lr_frac, extra_eval=extra,
    )  # fmt: skip
    return chat_stage.run_stage(args, stage, model, tokenizer, meta, train_task, val_task, base)


if __name__ == "__main__":
    run_main(main)
