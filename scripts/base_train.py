"""Stage 3: pretrain the base model. ``python -m scripts.base_train --depth=12`` (or torchrun).

The depth dial sets everything else: width, heads, the horizon (tokens =
ratio x scaling parameters), the total batch (2^19 tokens at d12, growing as D^0.383 with
the data, a power of two), the learning rates (scaled with width and batch) and gradient
accumulation (total batch / (device batch x sequence x processes), which must divide);
the arithmetic lives in nanochat/model/dial.py, so a dry run shows it without torch.

Each step logs step/total, loss, LR multiplier, ms/step, tokens/s, MFU and ETA (a progress
bar too at a terminal); val bits-per-byte every --eval-every steps; checkpoints every
--save-every steps and at the end (nanochat/training/checkpoint.py). A run resumes from its latest
complete checkpoint (--resume=auto, the default; NANOCHAT_RESUME sets the default), and
SIGTERM (preemption) saves a checkpoint and exits with 143 so a retry resumes.
Writes base_checkpoints/<tag>/ and report/pretrain.md (the stage's completion marker).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    base_dir,
    log,
    positive_int,
    run_main,
)
from nanochat.model.dial import SEQ_LEN
from nanochat.training import recipe, schedules
from nanochat.training.train_loop import (
    StepResult,
    Trainer,
    add_loop_arguments,
    run,
    train_step,
)


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.base_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=positive_int, default=20, help="the size dial (default 20)")
    p.add_argument("--dataset", default="climbmix", help="shards under base_data/<dataset>")
    p.add_argument("--device-batch", type=positive_int, default=32, help="rows per micro-step")
    p.add_argument(
        "--seq-len", type=positive_int, default=SEQ_LEN, help=f"context length (default {SEQ_LEN})"
    )
    p.add_argument(
        "--total-batch", type=positive_int, help="tokens per optimizer step (default: derived)"
    )
    p.add_argument("--ratio", type=float, default=12.0, help="data tokens per scaling param")
    p.add_argument(
        "--lr-scale",
        type=float,
        default=1.0,
        help="multiply every base LR (tiny CPU batches are far below the recipe's 2^19 tokens)",
    )
    p.add_argument(
        "--lr-scale-per-pass",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="--lr-scale (above 1) is fitted for one pass over the data: a run of E passes "
        "(the training split counted once, BOS included) takes scale / E**2, so training "
        "longer on a small dataset does not memorize it (the tiny preset)",
    )
    p.add_argument("--num-steps", type=positive_int, help="steps (default: from --ratio)")
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (0 = end)")
    p.add_argument(
        "--eval-batches",
        type=positive_int,
        default=20,
        help="val batches per eval and process, each val token scored once (default 20)",
    )
    p.add_argument("--core-every", type=int, default=2000, help="CORE every N steps (0 = off)")
    p.add_argument("--core-bundle", choices=("dclm", "embedded"), default="dclm")
    p.add_argument("--core-max-per-task", type=positive_int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="samples every N (0 = off)")
    add_loop_arguments(p, save_every=1000, tag_help="default d<depth>")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls (H100, torchao)")
    recipe.add_arguments(p)
    return p


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from nanochat import runtime
    from nanochat.data.shards import data_dir, split_shards
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    base = base_dir()
    try:
        tokenizer = Tokenizer.load(tokenizer_dir(base))
        train_paths, val_path = split_shards(data_dir(base, args.dataset))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{exc} (run `make download` and `make tokenizer` first)") from None
    rt = runtime.start()
    try:
        return train(args, rt, tokenizer, train_paths, val_path, base)
    finally:
        runtime.stop(rt)


def train(args, rt, tokenizer, train_paths, val_path, base: Path) -> int:
    return run(Pretraining(args, rt, tokenizer, train_paths, val_path, base), args, base)


class Pretraining(Trainer):
    """Pretraining's own parts of the one loop (nanochat/training/train_loop.py): the model the
    dial builds, packed shards, the warmup/warmdown schedule, val bpb every --eval-every, CORE
    and samples when due, and the report section with the throughput."""

    name = "pretrain"
    # what a checkpoint from before the recipe's switches (and the per-pass LR) was made with
    legacy_config = {**recipe.LEGACY, "lr_scale_per_pass": False}

    def __init__(self, args, rt, tokenizer, train_paths, val_path, base: Path):
        from nanochat.data.dataloader import PackedLoader
        from nanochat.evaluation.loss_eval import token_bytes
        from nanochat.model import dial, gpt
        from nanochat.training import checkpoint, optim, run_state

        self.args, self.rt, self.tokenizer, self.base = args, rt, tokenizer, base
        self.val_path, self.val_rows = val_path, None
        # checked before any work: a missing wandb is bad input
        self.wandb_run = run_state.start_wandb(args.run, rt)
        if args.fp8 and rt.device.type != "cuda":
            raise UsageError("--fp8 needs a CUDA GPU (H100 class); drop it on this machine")
        run_state.seed(args.seed)
        check_memory(args, tokenizer.vocab_size, rt)
        try:
            self.config = gpt.config_for_depth(
                args.depth, tokenizer.vocab_size, sequence_len=args.seq_len,
                **recipe.model_options(args),
            )  # fmt: skip
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.model = gpt.build_model(self.config, rt.device)
        self.scaling = gpt.scaling_params(self.model)
        self.dial = dial.plan(
            args.depth, tokenizer.vocab_size, args.seq_len, args.device_batch, rt.world_size,
            args.ratio, args.total_batch, args.num_steps,
        )  # fmt: skip
        if self.dial.scaling != self.scaling:
            raise RuntimeError(
                f"dial counts {self.dial.scaling} scaling params, the model {self.scaling}"
            )
        self.total_batch, self.num_steps = self.dial.total_batch, self.dial.steps
        self.weight_decay = dial.scaled_weight_decay(
            args.weight_decay, args.depth, tokenizer.vocab_size, self.total_batch
        )
        self.optimizer = optim.build_optimizer(
            gpt.param_groups(self.model), self.config.n_embd, self.total_batch,
            weight_decay=self.weight_decay, **recipe.optimizer_options(args),
        )  # fmt: skip
        # a data stream per process; a checkpoint of another process count deals them out again
        try:
            self.loader = PackedLoader(
                train_paths, tokenizer, args.device_batch, args.seq_len, rt.rank,
                rt.world_size, rt.device, accumulation=self.dial.accumulation,
            )  # fmt: skip
        except ValueError as exc:  # too few row groups for the processes: bad input
            raise UsageError(str(exc)) from None
        self.tag = args.tag or f"d{args.depth}"
        self.ckpt_dir = checkpoint.checkpoint_dir(base, "base", self.tag)
        self.run_config = {
            "depth": args.depth,
            "seq_len": args.seq_len,
            "device_batch": args.device_batch,
            "total_batch": self.total_batch,
            "num_steps": self.num_steps,
            "dataset": args.dataset,
            "lr_scale": args.lr_scale,
            "lr_scale_per_pass": args.lr_scale_per_pass,
            **recipe.as_config(args),
        }
        self.position = self.loader
        lr_scale, passes = args.lr_scale, None
        if self.start_or_resume(args.resume) is None:  # a resume's LRs come with its optimizer
            lr_scale, passes = self.scale_for(train_paths)
            run_state.scale_lrs(self.optimizer, lr_scale)
        self.bytes_per_token = token_bytes(tokenizer, rt.device)
        self.flops_per_token = gpt.flops_per_token(self.config)
        self.peak = rt.peak_flops()
        self.bundle = None
        if args.core_every and self.num_steps >= args.core_every:
            self.bundle = core_bundle(args, base, rt)
        if args.fp8:
            from nanochat.model.fp8 import use_fp8

            use_fp8(self.model)
        self.forward = run_state.compiled(self.model, args.compile, rt)
        if rt.master:
            for line in self.dial.describe():
                log(line)
            log(f"{recipe.describe(args)} (decay here {self.weight_decay:.4g})")
            if passes is not None:
                log(
                    f"LR scale {args.lr_scale:g} is for one pass over the data; this run makes "
                    f"{passes:.2f} passes over its training split, so LRs x {lr_scale:.3g}"
                )
            log(
                f"pretrain d{args.depth}: accumulation {self.dial.accumulation}, "
                f"{rt.world_size} process(es), {rt.dtype} on {rt.device.type}, "
                f"from step {self.start_step}"
            )

    def scale_for(self, train_paths) -> tuple[float, float | None]:
        """(the LR scale of a fresh run, its passes over the training split or None): the
        --lr-scale, or with --lr-scale-per-pass scale / passes**2 (schedules), the split
        counted once, by rank 0, and the count shared."""
        args, rt = self.args, self.rt
        if not args.lr_scale_per_pass or args.lr_scale <= 1:
            return args.lr_scale, None
        from nanochat.data.dataloader import count_tokens

        planned = self.num_steps * self.total_batch
        counted = count_tokens(train_paths, self.tokenizer, limit=planned) if rt.master else None
        passes = planned / rt.collect(counted)[0]
        return schedules.lr_scale_for_passes(args.lr_scale, passes), passes

    def val_bpb(self) -> float:
        """Bits per byte over the val split's first rows, every token scored once, in the
        same order every time (``EvalRows``): --eval-batches x device batch x processes."""
        from nanochat.data.dataloader import EvalRows
        from nanochat.evaluation.loss_eval import evaluate_bpb

        args, rt = self.args, self.rt
        if self.val_rows is None:
            rows = args.eval_batches * args.device_batch * rt.world_size
            self.val_rows = EvalRows([self.val_path], self.tokenizer, args.device_batch,
                                     args.seq_len, rows, rt.device)  # fmt: skip
        batches = self.val_rows.batches(rt.rank, rt.world_size)
        self.model.eval()
        with rt.autocast():
            result = evaluate_bpb(self.forward, batches, None, self.bytes_per_token)
        self.model.train()
        return result

    def lr_multiplier(self, step: int) -> float:
        return schedules.lr_multiplier(step, self.num_steps)

    def muon_momentum(self, step: int) -> float:
        return schedules.muon_momentum(step, self.num_steps, self.args.momentum)

    def weight_decay_multiplier(self, step: int) -> float:
        return schedules.weight_decay_multiplier(step, self.num_steps)

    def before_step(self, step: int) -> None:
        """Val bpb, CORE and samples when due (rank 0 prints; every rank evaluates its share)."""
        args, rt = self.args, self.rt
        if step == self.start_step:
            return
        if args.eval_every and step % args.eval_every == 0:
            self.bpb = self.val_bpb()
            if rt.master:
                log(f"step {step}: val bpb {self.bpb:.4f}")
                if self.wandb_run:
                    self.wandb_run.log({"val_bpb": self.bpb}, step=step)
        metrics = {}
        if self.bundle is not None and step % args.core_every == 0:
            metrics["core"] = run_core(self.model, self.tokenizer, self.bundle, args, rt)
        if args.sample_every and step % args.sample_every == 0 and rt.master:
            print_samples(self.model, self.tokenizer, args.seq_len, rt)
        if metrics and rt.master:
            log(f"step {step}: CORE {metrics['core']:.4f}")
            if self.wandb_run:
                self.wandb_run.log(metrics, step=step)

    def train_step(self, step: int) -> StepResult:
        loss = train_step(
            self.forward, self.model, self.optimizer, self.loader, self.dial.accumulation, self.rt
        )
        return StepResult(loss, metrics={"loss": loss})

    def progress_extra(self, result, seconds: float) -> str:
        tokens_per_s = self.total_batch / seconds
        result.metrics["tokens_per_s"] = tokens_per_s
        mfu = "n/a"
        if self.peak:
            used = self.flops_per_token * tokens_per_s / (self.peak * self.rt.world_size)
            mfu = f"{100 * used:.1f}%"
        return f"{tokens_per_s:,.0f} tok/s | mfu {mfu}"

    def finish(self, step: int, record) -> None:
        from nanochat.model import gpt
        from nanochat.report import write_section

        args, rt = self.args, self.rt
        self.bpb = self.val_bpb()
        seconds = record.seconds
        if not rt.master:
            return
        log(f"done: val bpb {self.bpb:.4f} after {seconds / 60:.1f} min")
        write_section(
            self.base,
            "pretrain",
            "Base pretraining",
            {
                "depth": args.depth,
                "parameters": f"{gpt.num_params(self.model):,}",
                "scaling parameters": f"{self.scaling:,}",
                "steps": self.num_steps,
                "tokens per step": self.total_batch,
                "tokens": f"{self.num_steps * self.total_batch:,}",
                "processes": rt.world_size,
                "wall time (this run)": f"{seconds / 60:.1f} min",
                "median step": record.median_step(),
                "final val bpb": f"{self.bpb:.4f}",
                "first / last loss": record.first_last_loss(),
            },
            metrics={"val_bpb": self.bpb},
            wall_seconds=seconds,
        )


def core_bundle(args, base: Path, rt):
    """The CORE bundle, ready before training starts (a missing one is bad input)."""
    from nanochat.evaluation import bundle_fetch, eval_bundle

    try:
        return bundle_fetch.ensure_on_all_ranks(base, args.core_bundle, rt)
    except eval_bundle.BundleError as exc:
        raise UsageError(
            f"--core-every needs the CORE bundle: {exc}; "
            "use --core-bundle=embedded offline, or --core-every=0"
        ) from None


def run_core(model, tokenizer, bundle, args, rt) -> float:
    from nanochat.evaluation import core_eval

    model.eval()
    with rt.autocast():
        result = core_eval.evaluate_core(
            model, tokenizer, bundle, rt.device, args.core_max_per_task, max_seq_len=args.seq_len
        )
    model.train()
    return result.core


def print_samples(model, tokenizer, context: int, rt) -> None:
    from nanochat.evaluation.samples import SAMPLE_PROMPTS, greedy_completion

    model.eval()
    with rt.autocast():
        for prompt in SAMPLE_PROMPTS[:3]:
            text = greedy_completion(model, tokenizer, prompt, 24, context, rt.device)
            print(f"sample: {prompt}{text!r}", flush=True)
    model.train()


def planned(argv: list[str], processes: int, vocab: int, args=None):
    """The dial these flags give (``nanochat.model.dial.Dial``): what a run of this command trains.
    The launcher sizes downloads and prices runs with it (no torch)."""
    from nanochat.model import dial

    args = args or build_parser().parse_args(argv)
    return dial.plan(
        args.depth, vocab, args.seq_len, args.device_batch, processes, args.ratio,
        args.total_batch, args.num_steps,
    )  # fmt: skip


def explain(argv: list[str], processes: int, base: Path) -> list[str]:
    """What the dial derives for these flags (the launcher's dry run prints it; no torch)."""
    from nanochat.model import dial

    meta = base / "tokenizer" / "tokenizer.json"
    vocab, source = dial.DEFAULT_VOCAB, "assumed: no tokenizer yet"
    if meta.is_file():
        vocab, source = json.loads(meta.read_text())["vocab_size"], "from tokenizer.json"
    args = build_parser().parse_args(argv)
    try:
        the_dial = planned(argv, processes, vocab, args)
    except UsageError as exc:
        return [f"warning: {exc}"]
    precision = "fp8 matmuls" if args.fp8 else "bf16 matmuls on CUDA"
    lr = f"LRs x {args.lr_scale:g}"
    if args.lr_scale_per_pass and args.lr_scale > 1:
        lr += " for one pass over the training split, / passes^2 over more (counted at start)"
    return [
        *the_dial.describe(),
        f"{recipe.describe(args)}; {precision}; {lr}",
        f"vocab {vocab:,} {source}",
    ]


def check_memory(args, vocab_size: int, rt) -> None:
    """Refuse, before allocating anything, a model that cannot train in this machine's
    memory even without activations (DEPTH=99999 would otherwise try to allocate ~100 GB
    and die in a traceback)."""
    from nanochat.common import human_bytes
    from nanochat.model import dial

    have = rt.memory_bytes()
    need = dial.least_training_bytes(args.depth, vocab_size, args.device_batch, args.seq_len)
    if rt.agree(have is not None and need > have):  # every rank stops, or none
        where = "per GPU" if rt.device.type == "cuda" else "available per process"
        raise UsageError(
            f"depth {args.depth} needs at least {human_bytes(need)} to train "
            f"({dial.total_params(args.depth, vocab_size) / 1e6:,.0f}M parameters with their "
            f"gradients and optimizer state), and this machine has "
            f"{human_bytes(have) if have else 'less'} {where}: choose a smaller DEPTH "
            "(or --device-batch)"
        )


if __name__ == "__main__":
    run_main(main)
