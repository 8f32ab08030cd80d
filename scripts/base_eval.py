"""Stage 4: evaluate the base model: CORE, bits per byte on train and validation, samples.

    python -m scripts.base_eval                                   # newest checkpoint, DCLM CORE
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --device-batch=32
    python -m scripts.base_eval --bundle=embedded                 # the tiny preset: offline
    python -m scripts.base_eval --max-per-task=100 --source=/data/eval_bundle.zip
    make base-eval PRESET=tiny

Loads the latest complete checkpoint of ``BASE_DIR/base_checkpoints/<tag>/`` (default: the tag
whose newest checkpoint is the most recent) and rebuilds the model from its meta. Then:

- bits per byte on the first ``--bpb-steps`` batches of the training shards and of the
  validation shard, each token scored once in a fixed order (nanochat/evaluation/loss_eval.py);
- CORE (nanochat/evaluation/core_eval.py) on the DCLM bundle, downloaded on first use into
  ``BASE_DIR/eval_bundle/`` (``--source`` names a mirror URL or a local zip), or on the
  embedded miniature bundle built from the stdlib corpus (``--bundle=embedded``);
- greedy completions of a few fixed prompts (rank 0).

Writes ``report/base-eval-core.csv`` (per task: accuracy and centered accuracy, then CORE)
and the report section ``report/base-eval.md`` (last: the stage's completion marker). Under
torchrun every rank evaluates its share of each task and of the bpb batches; rank 0 fetches
the bundle and writes. bf16 autocast on CUDA (nanochat/runtime.py), fp32 on CPU.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    atomic_write_text,
    base_dir,
    log,
    non_negative_int,
    one_line,
    positive_int,
    run_main,
)
from nanochat.evaluation.eval_bundle import BUNDLES
from nanochat.evaluation.samples import (
    SAMPLE_PROMPTS,
    SAMPLE_TOKENS,
    greedy_completion,
    printable,
)

DEFAULT_DATASET = "climbmix"  # when neither --dataset nor the checkpoint names one
DEFAULT_DEVICE_BATCH = 32
CSV_NAME = "base-eval-core.csv"


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.base_eval",
        description="Evaluate the base model: CORE, bits per byte, samples (stage base-eval).",
    )
    ckpt = parser.add_argument_group("checkpoint")
    ckpt.add_argument(
        "--tag",
        help="folder under BASE_DIR/base_checkpoints/, e.g. d12 (default: the one with the "
        "most recent checkpoint)",
    )
    ckpt.add_argument(
        "--step",
        type=non_negative_int,
        help="training step of the checkpoint (default: the latest complete one)",
    )
    core = parser.add_argument_group("CORE")
    core.add_argument(
        "--bundle",
        choices=BUNDLES,
        default="dclm",
        help="dclm: the official 22-task bundle, downloaded on first use (default); "
        "embedded: the offline miniature bundle built from the stdlib corpus (tiny preset)",
    )
    core.add_argument(
        "--source",
        help="dclm bundle only: a mirror URL or a local eval_bundle.zip "
        "(default: the official URL)",
    )
    core.add_argument(
        "--max-per-task",
        type=positive_int,
        help="examples per task, a fixed random subset (default: all; a quick-look knob)",
    )
    bpb = parser.add_argument_group("bits per byte")
    bpb.add_argument(
        "--dataset",
        help="shards under BASE_DIR/base_data/<dataset> (default: the one the checkpoint "
        f"was trained on, else {DEFAULT_DATASET})",
    )
    bpb.add_argument(
        "--device-batch",
        type=positive_int,
        help="sequences per device per bpb batch (default: the checkpoint's training value, "
        f"else {DEFAULT_DEVICE_BATCH})",
    )
    bpb.add_argument(
        "--bpb-steps",
        type=positive_int,
        default=20,
        help="batches per split; tokens = steps x device batch x sequence length x "
        "processes (default: 20)",
    )
    return parser


def bits_per_byte(model, tokenizer, paths, batch: int, seq_len: int, steps: int, rt) -> float:
    """Over the split's first ``steps`` x ``batch`` x processes rows, each token scored once
    in a fixed order (``EvalRows``), so two runs and two models compare."""
    from nanochat.data.dataloader import EvalRows
    from nanochat.evaluation.loss_eval import evaluate_bpb, token_bytes

    rows = EvalRows(paths, tokenizer, batch, seq_len, steps * batch * rt.world_size, rt.device)
    with rt.autocast():
        return evaluate_bpb(
            model, rows.batches(rt.rank, rt.world_size), None, token_bytes(tokenizer, rt.device)
        )


# --- outputs -------------------------------------------------------------------------------


def core_csv(result) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["task", "type", "shots", "examples", "accuracy", "random_baseline_pct", "centered"]
    )
    for t in result.tasks:
        writer.writerow(
            [t.label, t.task_type, t.num_fewshot, t.examples, f"{t.accuracy:.6f}",
             f"{t.random_baseline:g}", f"{t.centered:.6f}"]
        )  # fmt: skip
    writer.writerow(["CORE", "", "", "", "", "", f"{result.core:.6f}"])
    return out.getvalue()


def core_table(result) -> str:
    lines = [
        "| task | type | shots | examples | accuracy | random | centered |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in result.tasks:
        lines.append(
            f"| {t.label} | {t.task_type} | {t.num_fewshot} | {t.examples} | "
            f"{t.accuracy:.4f} | {t.random_baseline:g}% | {t.centered:+.4f} |"
        )
    lines.append(f"| **CORE** | | | | | | **{result.core:.4f}** |")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source is not None and args.bundle != "dclm":
        raise UsageError(
            "--source names where the dclm bundle comes from; the embedded one is built here"
        )
    base = base_dir()
    from nanochat.tokenizer import Tokenizer, tokenizer_dir
    from nanochat.training import checkpoint

    _, found = checkpoint.find(base, "base", args.tag, args.step, other_flag=None)
    try:
        tokenizer = Tokenizer.load(tokenizer_dir(base))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(one_line(exc)) from None

    from nanochat import runtime

    rt = runtime.start()
    try:
        return evaluate(args, base, found, tokenizer, rt)
    finally:
        runtime.stop(rt)


def evaluate(args, base: Path, found, tokenizer, rt) -> int:
    import torch

    from nanochat.data.shards import data_dir, split_shards
    from nanochat.evaluation import bundle_fetch, core_eval, eval_bundle
    from nanochat.report import write_section
    from nanochat.training import checkpoint

    start = time.monotonic()
    say = rt.master
    meta = found.meta
    saved = meta.get("run_config", {})
    checkpoint.model_config(found, tokenizer.vocab_size)  # before any heavy work
    dataset = checkpoint.inherited("dataset", args.dataset, saved, DEFAULT_DATASET, say)
    device_batch = checkpoint.inherited(
        "device_batch", args.device_batch, saved, DEFAULT_DEVICE_BATCH, say
    )
    try:
        train_paths, val_path = split_shards(data_dir(base, dataset))
    except FileNotFoundError as exc:
        raise UsageError(f"{exc}: run `make download DATASET={dataset}` first") from None

    # --- the eval bundle: rank 0 fetches or builds it, the others wait and read it
    try:
        bundle = bundle_fetch.ensure_on_all_ranks(base, args.bundle, rt, args.source)
    except eval_bundle.BundleError as exc:
        hint = (
            "; give --source=<mirror URL or local eval_bundle.zip>, or --bundle=embedded "
            "to evaluate offline"
            if args.bundle == "dclm"
            else ""
        )
        raise UsageError(f"no CORE eval bundle: {exc}{hint}") from None

    # --- model
    model = checkpoint.load_model(found, rt.device, tokenizer.vocab_size)
    config = model.config
    seq_len = config.sequence_len
    if say:
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"base model {found.directory.name} step {found.step}: {config.n_layer} layers, "
            f"{config.n_embd} wide, {n_params / 1e6:.1f}M parameters, on {rt.device} "
            f"x{rt.world_size}"
        )

    # --- bits per byte
    bpb = {}
    for split, paths in (("train", train_paths), ("val", [val_path])):
        bpb[split] = bits_per_byte(
            model, tokenizer, paths, device_batch, seq_len, args.bpb_steps, rt
        )
        if say:
            log(f"{split} bpb {bpb[split]:.4f}")
    bpb_tokens = args.bpb_steps * device_batch * seq_len * rt.world_size

    # --- CORE
    def progress(t: core_eval.TaskResult) -> None:
        if say:
            log(
                f"{t.label}: accuracy {t.accuracy:.4f}, centered {t.centered:+.4f} "
                f"({t.examples} examples, {t.num_fewshot}-shot, {t.seconds:.1f} s)"
            )

    def model_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids)  # (B, T) -> (B, T, V) logits

    try:
        with rt.autocast():
            result = core_eval.evaluate_core(
                model_fn,
                tokenizer,
                bundle,
                rt.device,
                args.max_per_task,
                max_seq_len=seq_len,
                on_task=progress,
            )
    except eval_bundle.BundleError as exc:  # a malformed data file, seen by every rank
        raise UsageError(f"{exc} (delete {bundle.root} to fetch or build it again)") from None

    if not rt.master:
        return 0

    # --- samples
    samples = []
    with rt.autocast():
        for prompt in SAMPLE_PROMPTS:
            text = greedy_completion(model, tokenizer, prompt, SAMPLE_TOKENS, seq_len, rt.device)
            samples.append(f"{prompt}{text}")

    # --- outputs (the report section last: it marks the stage complete)
    report_dir = base / "report"
    atomic_write_text(report_dir / CSV_NAME, core_csv(result))
    table = core_table(result)
    sample_block = "\n".join(printable(s) for s in samples)
    provenance = bundle.record.get("sha256") or bundle.record.get("source") or "?"
    facts = {
        "checkpoint": f"{found.directory.name} step {found.step}",
        "model": f"{config.n_layer} layers, {config.n_embd} wide, vocab {config.vocab_size}",
        "CORE": f"{result.core:.4f} ({args.bundle} bundle, {len(result.tasks)} tasks)",
        "CORE examples per task": "all" if args.max_per_task is None else args.max_per_task,
        "eval bundle": f"{bundle.root} (sha256 {provenance})"
        if args.bundle == "dclm"
        else f"{bundle.root} (built from the {bundle.record.get('python', '?')} stdlib)",
        "train bpb": f"{bpb['train']:.4f}",
        "val bpb": f"{bpb['val']:.4f}",
        "bpb tokens per split": f"{bpb_tokens:,} ({dataset})",
        "processes": rt.world_size,
        "device": str(rt.device),
        "seconds": f"{time.monotonic() - start:.1f}",
    }
    body = f"{table}\n\nGreedy samples:\n\n```\n{sample_block}\n```\n"
    write_section(
        base,
        "base-eval",
        "Base model evaluation",
        facts,
        body,
        metrics={"CORE": result.core, "train_bpb": bpb["train"], "val_bpb": bpb["val"]},
        wall_seconds=time.monotonic() - start,
    )

    print(table)
    print(f"\nCORE {result.core:.4f} | train bpb {bpb['train']:.4f} | val bpb {bpb['val']:.4f}")
    print("\nsamples:")
    for sample in samples:
        print(f"  {printable(sample)}")
    print(f"\n-> {report_dir / CSV_NAME}, {report_dir / 'base-eval.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
