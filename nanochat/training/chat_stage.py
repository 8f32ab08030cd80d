"""Midtraining and SFT: a chat model trained on a task mixture, through the one training loop.

Both stages start from a checkpoint of the stage before (``checkpoint.find``), hold out the
first ~5% of the shuffled mixture for a val loss, and train with MuonAdamW at the base LRs for
this width and batch, times ``--lr-scale`` and the stage's LR fraction. What differs is a
``ChatStage``: midtraining packs conversations like pretraining (every token trained), SFT
pads one conversation per row (loss on assistant tokens), each with its own LR decay and SFT
with its ChatCORE subset as an extra eval. The scripts (scripts/mid_train.py,
scripts/chat_sft.py) build the mixture and the ChatStage; everything else is here.

Sequence length and device batch default to the source checkpoint's (logged "inherited X"),
a flag overrides them (logged "overriding X"). A fresh run warm-starts from the source
checkpoint's optimizer moments when they fit (``--warm-start``; run_state.warm_start).
Every ``--eval-every`` steps and at the end: the held-out conversations' loss per target token
and bits per byte (special tokens' bytes count neither way, as in pretraining's val bpb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import CliParser, UsageError, log, positive_int
from nanochat.training.train_loop import StepResult, Trainer, add_loop_arguments

VAL_FRACTION = 0.05
MAX_VAL_ITEMS = 500
DEFAULT_DEVICE_BATCH = 32  # rows per micro-step when the source checkpoint does not say


def add_arguments(p: CliParser, *, eval_every: int, save_every: int) -> None:
    """The flags midtraining and SFT share."""
    p.add_argument(
        "--device-batch",
        type=positive_int,
        help=f"rows per micro-step (default: the source checkpoint's, else {DEFAULT_DEVICE_BATCH})",
    )
    p.add_argument(
        "--seq-len", type=positive_int, help="context length (default: the source checkpoint's)"
    )
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every base LR")
    p.add_argument("--num-steps", type=positive_int, help="steps (default: one epoch)")
    p.add_argument("--eval-every", type=int, default=eval_every, help="val eval every N (0=end)")
    p.add_argument("--eval-batches", type=positive_int, default=20, help="val batches per eval")
    p.add_argument("--tasks", choices=("embedded", "hub"), default="hub", help="task data")
    add_loop_arguments(p, save_every=save_every, tag_help="default: the source checkpoint's tag")
    p.add_argument(
        "--warm-start",
        choices=("auto", "off"),
        default="auto",
        help="auto: a fresh run starts from the source checkpoint's optimizer moments when they "
        "fit (same processes, same parameter shapes); off: a fresh optimizer (default auto)",
    )


def split_val(mixture):
    """(train, val): the first ~5% of the shuffled mixture is held out for the val loss."""
    from nanochat.tasks import TaskSlice

    n_val = max(1, min(MAX_VAL_ITEMS, int(len(mixture) * VAL_FRACTION)))
    if len(mixture) < 2 * n_val:
        raise UsageError(f"the mixture has only {len(mixture)} conversations")
    return TaskSlice(mixture, n_val), TaskSlice(mixture, 0, n_val)


@dataclass
class ChatStage:
    """What differs between midtraining and SFT.

    ``extra_eval`` (optional) is an eval run besides the val loss, every ``extra_eval.every``
    steps (0 = never) and at the end: ``extra_eval(model, tokenizer, rt)`` is called on every
    rank with the plain (uncompiled) model in eval mode under ``torch.no_grad`` and returns
    ``(line, facts, metrics)``: a log line, and the facts and metrics of the last call go into
    the report section. SFT's ChatCORE subset is one.
    """

    name: str  # report section and step log name
    title: str
    kind: str  # checkpoint kind written
    packed: bool  # packed rows (midtraining) or one padded conversation per row (SFT)
    warmdown_frac: float
    lr_frac: float
    extra_eval: object = None


def run_stage(args, stage: ChatStage, model, tokenizer, meta, train_task, val_task, base: Path):
    """Train ``model`` (loaded from the checkpoint ``meta`` describes) on ``train_task``."""
    from nanochat import runtime
    from nanochat.training import train_loop

    rt = runtime.start()
    try:
        trainer = ChatTraining(args, stage, rt, model, tokenizer, meta, train_task, val_task, base)
        return train_loop.run(trainer, args, base)
    finally:
        runtime.stop(rt)


class ChatTraining(Trainer):
    """Midtraining's and SFT's hooks of the one loop."""

    def __init__(self, args, stage, rt, model, tokenizer, meta, train_task, val_task, base):
        from nanochat.evaluation.loss_eval import token_bytes
        from nanochat.model import gpt
        from nanochat.training import checkpoint, optim, recipe, run_state

        self.args, self.stage, self.rt, self.tokenizer = args, stage, rt, tokenizer
        self.train_task, self.val_task, self.base = train_task, val_task, base
        self.name = stage.name
        # a missing wandb is bad input: before any work
        self.wandb_run = run_state.start_wandb(args.run, rt)
        run_state.seed(args.seed)
        self.model = model.to(rt.device)
        self.model.train()
        config = self.config = model.config
        saved = meta.get("run_config", {})
        self.seq_len = checkpoint.inherited(
            "seq_len", args.seq_len, saved, config.sequence_len, rt.master
        )
        self.device_batch = checkpoint.inherited(
            "device_batch", args.device_batch, saved, DEFAULT_DEVICE_BATCH, rt.master
        )
        if self.seq_len > config.sequence_len:
            raise UsageError(f"--seq-len {self.seq_len} exceeds the model's {config.sequence_len}")
        total_batch = self._plan_batches(args)
        self.optimizer = optim.build_optimizer(
            gpt.param_groups(model), config.n_embd, total_batch, **recipe.optimizer_defaults()
        )
        run_state.scale_lrs(self.optimizer, args.lr_scale * stage.lr_frac)
        self.loader = self._loader(train_task)
        self.tag = args.tag or meta["tag"]
        self.ckpt_dir = checkpoint.checkpoint_dir(base, stage.kind, self.tag)
        source = f"{meta['directory']} step {meta['step']}"
        self.run_config = {
            "init_from": source,
            "seq_len": self.seq_len,
            "device_batch": self.device_batch,
            "accumulation": self.accumulation,
            "num_steps": self.num_steps,
            "tasks": args.tasks,
            "world_size": rt.world_size,
            "lr_scale": args.lr_scale,
            "lr_frac": stage.lr_frac,
        }
        self.position = self.loader
        found = self.start_or_resume(args.resume)
        if found:
            # Not compared by resume (a resumed run does not warm-start): carried over.
            warm = found.meta.get("run_config", {}).get("warm_start", "n/a")
        elif args.warm_start == "auto":
            why = run_state.warm_start(self.optimizer, meta, rt)
            warm = f"off: {why}" if why else f"optimizer state of {source}"
            if rt.master:
                log(
                    f"warm start: off, starting the optimizer fresh: {why}"
                    if why
                    else f"warm start: optimizer moments from {source}, this stage's LRs"
                )
        else:
            warm = "off (--warm-start=off)"
        self.run_config["warm_start"] = warm
        self.forward = run_state.compiled(self.model, args.compile, rt)
        self.bytes_per_token = token_bytes(tokenizer, rt.device)
        self.extra_facts: dict = {}
        self.extra_metrics: dict = {}
        if rt.master:
            log(
                f"{stage.name} from {source}: {len(train_task):,} conversations, "
                f"{self.num_steps} steps, accumulation {self.accumulation}, "
                f"{rt.world_size} process(es), {rt.dtype} on {rt.device.type}, "
                f"from step {self.start_step}"
            )

    def _plan_batches(self, args) -> int:
        """Set accumulation and the number of steps; the tokens per step the LRs scale with."""
        rows_per_step = self.device_batch * self.rt.world_size
        if self.stage.packed:
            micro = rows_per_step * self.seq_len
            total_batch = args.total_batch or micro
            if total_batch % micro:
                raise UsageError(
                    f"--total-batch {total_batch} is not a multiple of device batch x seq len x "
                    f"processes = {micro}"
                )
            self.accumulation = total_batch // micro
            per_step = total_batch
        else:
            examples = getattr(args, "examples_per_step", None) or rows_per_step
            if examples % rows_per_step:
                raise UsageError(
                    f"--examples-per-step {examples} is not a multiple of device batch x "
                    f"processes = {rows_per_step}"
                )
            self.accumulation = examples // rows_per_step
            total_batch = examples * self.seq_len  # for the LR scaling only
            per_step = examples
        self.num_steps = args.num_steps or max(1, self._epoch_units() // per_step)
        return total_batch

    def _epoch_units(self) -> int:
        """One epoch of the training mixture in this stage's units: tokens when packed (every
        conversation rendered: only done when --num-steps leaves the epoch to decide), else
        conversations."""
        if not self.stage.packed:
            return len(self.train_task)
        render = self.tokenizer.render_conversation
        return sum(len(render(c, self.seq_len + 1)[0]) for c in self.train_task)

    def _loader(self, task):
        from nanochat.data.chat_data import PackedConversations, PaddedConversations

        cls = PackedConversations if self.stage.packed else PaddedConversations
        rt = self.rt
        return cls(
            task, self.tokenizer, self.device_batch, self.seq_len, rt.rank, rt.world_size,
            rt.device,
        )  # fmt: skip

    def val_metrics(self) -> tuple[float, float]:
        """(loss per target token, bits per byte) over --eval-batches held-out batches; the
        bytes of special tokens count neither way (as in pretraining's val bpb)."""
        import torch

        from nanochat.evaluation.loss_eval import loss_sums

        val = self._loader(self.val_task)
        self.model.eval()
        with torch.no_grad(), self.rt.autocast():
            sums = loss_sums(self.forward, iter(val), self.args.eval_batches, self.bytes_per_token)
        self.model.train()
        nats_all, tokens, nats_text, text_bytes = sums
        return nats_all / max(tokens, 1), nats_text / (math.log(2) * max(text_bytes, 1))

    def run_extra(self, at: int) -> None:
        import torch

        self.model.eval()
        with torch.no_grad():
            line, self.extra_facts, self.extra_metrics = self.stage.extra_eval(
                self.model, self.tokenizer, self.rt
            )
        self.model.train()
        if self.rt.master:
            log(f"step {at}: {line}")
            if self.wandb_run:
                self.wandb_run.log(self.extra_metrics, step=at)

    def lr_multiplier(self, step: int) -> float:
        from nanochat.training import schedules

        return schedules.lr_multiplier(
            step, self.num_steps, warmup_steps=0, warmdown_frac=self.stage.warmdown_frac,
            final_frac=0.0,
        )  # fmt: skip

    def before_step(self, step: int) -> None:
        args, extra = self.args, self.stage.extra_eval
        if args.eval_every and step % args.eval_every == 0 and step > self.start_step:
            vloss, vbpb = self.val_metrics()
            if self.rt.master:
                log(f"step {step}: val loss {vloss:.4f}, val bpb {vbpb:.4f}")
        if extra and extra.every and step % extra.every == 0 and step > 0:
            self.run_extra(step)

    def train_step(self, step: int) -> StepResult:
        from nanochat.training.train_loop import train_step

        loss = train_step(
            self.forward, self.model, self.optimizer, self.loader, self.accumulation, self.rt
        )
        return StepResult(loss, metrics={"loss": loss})

    def progress_extra(self, result: StepResult, seconds: float) -> str:
        return f"epoch {self.loader.epoch}"

    def finish(self, step: int, record) -> None:
        from nanochat.report import write_section

        args, stage, rt = self.args, self.stage, self.rt
        vloss, vbpb = self.val_metrics()
        if stage.extra_eval and stage.extra_eval.every:
            self.run_extra(step)
        seconds = record.seconds
        if not rt.master:
            return
        log(f"done: val loss {vloss:.4f}, val bpb {vbpb:.4f} after {seconds / 60:.1f} min")
        write_section(
            self.base,
            stage.name,
            stage.title,
            {
                "from": self.run_config["init_from"],
                "tasks": f"{args.tasks}: {self.train_task.name}",
                "conversations": f"{len(self.train_task):,} (+{len(self.val_task):,} held out)",
                "steps": self.num_steps,
                "accumulation": self.accumulation,
                "processes": rt.world_size,
                "wall time (this run)": f"{seconds / 60:.1f} min",
                "final val loss": f"{vloss:.4f}",
                "final val bpb": f"{vbpb:.4f}",
                "first / last loss": record.first_last_loss(),
                "warm start": self.run_config["warm_start"],
                **self.extra_facts,
            },
            metrics={"val_loss": vloss, "val_bpb": vbpb, **self.extra_metrics},
            wall_seconds=seconds,
        )
