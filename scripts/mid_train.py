"""Stage 4: midtrain the base model on conversations. ``python -m scripts.mid_train``.

Starts from the latest complete base checkpoint (``--base-tag`` picks another) and trains on the
recipe's mixture (SmolTalk, MMLU auxiliary, GSM8K with calculator calls, identity and spelling
conversations; ``--tasks=embedded`` uses the offline miniatures, ``--tasks=hub`` the real data in
BASE_DIR/task_data), packed like pretraining with the loss on every token. MuonAdamW with the base
LRs for this width and batch, times ``--lr-scale`` and ``--init-lr-frac``; the LR is flat, then
decays linearly to 0 over the last 20% of the run. Warm start (``--warm-start=auto``, the default):
a fresh run (not resuming its own checkpoint) loads the source checkpoint's optimizer state -- Muon
momentum buffers, Adam moments and step counts, each rank its own shard -- when it fits (written by
as many processes, the same parameter groups and shapes), then sets this stage's LRs; otherwise one
log line says why and the optimizer starts fresh. The outcome is in run_config["warm_start"] and
the report. Every ``--eval-every`` steps and at the end: the held-out conversations' loss per
target token and bits per byte (special tokens' bytes count neither way, as in pretraining's val
bpb). Logs, checkpoints, resume and SIGTERM (checkpoint, exit 143) work as in every trainer (the
one loop, nanochat/training/train_loop.py): a ``--stop-at``, a kill or a preemption followed by the
same command gives the same model as an uninterrupted run. Sequence length and device batch default
to the base checkpoint's (the log says "inherited seq_len 2048"; a flag overrides it). Writes
mid_checkpoints/<tag>/ and report/midtrain.md (the stage's completion marker). This script holds
what is midtraining's own (the mixture, the packing, the schedule); the rest is
nanochat/training/chat_stage.py.
"""

from __future__ import annotations

from nanochat.common import (
    CliParser,
    UsageError,
    base_dir,
    positive_int,
    run_main,
)
from nanochat.training import chat_stage


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.mid_train", description=__doc__.split("\n\n")[0])
    chat_stage.add_arguments(p, eval_every=150, save_every=500)
    p.add_argument(
        "--total-batch", type=positive_int, help="tokens per step (default: one micro-step)"
    )
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="LR fraction to start at")
    p.add_argument("--base-tag", help="base checkpoint tag (default: the most recent)")
    return p


def mid_mixture(source: str, seed: int = 0):
    from nanochat.tasks import GSM8K, MMLU, Identity, Mixture, SmolTalk, SpellingBee

    return Mixture(
        [
            SmolTalk(source=source, split="train"),
            MMLU(subset="auxiliary_train", source=source, split="train"),
            GSM8K(source=source, split="train"),
            Identity(source="embedded"),  # only embedded exists
            SpellingBee(source="embedded"),
        ],
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.inference.engine import load_chat_model

    base = base_dir()
    model, tokenizer, meta = load_chat_model(base, "base", "cpu", args.base_tag, other_flag=None)
    try:
        train_task, val_task = chat_stage.split_val(mid_mixture(args.tasks))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{exc} (or use --tasks=embedded)") from None
    stage = chat_stage.ChatStage(
        name="midtrain",
        title="Midtraining",
        kind="mid",
        packed=True,
        warmdown_frac=0.2,
        lr_frac=args.init_lr_frac,
    )
    return chat_stage.run_stage(args, stage, model, tokenizer, meta, train_task, val_task, base)


if __name__ == "__main__":
    run_main(main)
