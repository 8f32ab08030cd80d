"""The one training loop: every trainer (pretraining, midtraining, SFT, RL) runs through ``run``.

Pretraining (scripts/base_train.py), midtraining and SFT (nanochat/training/chat_stage.py, used
by scripts/mid_train.py and scripts/chat_sft.py) and RL (scripts/chat_rl.py) differ in their
data, schedules and evals, not in how a step is scheduled, taken, timed, logged, shown and
ended. A trainer is a ``Trainer`` whose hooks say what is its own (the LR multiplier of a step,
the step itself, the evals due before or after it, the checkpoint, the final eval and report
section); ``run`` does the rest: the per-step JSONL log that resumes cleanly
(logs/<stage>-<tag>.jsonl, which feeds the report card's plots), the progress line or bar with
the ETA, wandb, and the end of a step (checkpoint when due, stop cleanly on SIGTERM/SIGINT or
--stop-at). ``train_step`` is the optimizer step with gradient accumulation the supervised
trainers share. Importing this module does not import torch (trainer scripts subclass
``Trainer`` at import time, and the launcher imports them for their flags).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import (
    add_resume_argument,
    atomic_write_text,
    log,
    positive_int,
    sweep_temp_files,
)


def add_loop_arguments(p, *, save_every: int, tag_help: str, compile: bool = True) -> None:
    """The flags every trainer shares, read by ``run`` and ``run_state``: --save-every,
    --stop-at, --resume, --tag, --run (wandb), --seed and (``compile``) --compile."""
    p.add_argument(
        "--save-every", type=int, default=save_every, help="checkpoint every N (0 = end)"
    )
    p.add_argument(
        "--stop-at", type=positive_int, help="stop with a checkpoint after this step (time-boxing)"
    )
    add_resume_argument(p)
    p.add_argument("--tag", help=f"checkpoint folder ({tag_help})")
    p.add_argument("--run", default="dummy", help="wandb run name; dummy = off")
    p.add_argument("--seed", type=int, default=42)
    if compile:
        p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")


def set_schedule(optimizer, lr_multiplier: float, momentum: float, wd_multiplier: float) -> None:
    """Every group's LR and weight decay from their initial values; Muon's momentum."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        if "initial_wd" in group:
            group["weight_decay"] = group["initial_wd"] * wd_multiplier
        if group.get("kind") == "muon":
            group["momentum"] = momentum


def train_step(forward, model, optimizer, loader, accumulation: int, runtime) -> float:
    """Forward/backward over ``accumulation`` micro-batches, one optimizer step; the mean
    loss of the step over every process's micro-batches (one host sync per step), so the
    logged loss is the whole batch's on any number of processes."""
    import torch
    import torch.distributed as dist

    total = torch.zeros((), device=runtime.device)
    for _ in range(accumulation):
        inputs, targets = loader.next_batch()
        with runtime.autocast():
            loss = forward(inputs, targets)
        (loss / accumulation).backward()
        total += loss.detach() / accumulation
    # the logged loss is the whole batch's: summed over ranks while the optimizer steps
    reduced = dist.all_reduce(total, async_op=True) if runtime.distributed else None
    optimizer.step()
    model.zero_grad(set_to_none=True)
    if reduced is not None:
        reduced.wait()
        total /= runtime.world_size
    return total.item()


def append_step(path: Path, step: int, loss: float, lrm: float, seconds: float, **extra) -> None:
    """One JSON line per step; ``extra`` adds keys (RL logs its mean ``reward``, which the
    report card plots instead of the loss)."""
    record = {"step": step, "loss": loss, "lrm": lrm, "ms": seconds * 1000, **extra}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_log_until(path: Path, step: int) -> None:
    """The step log without lines past ``step`` (a resumed run rewrites what follows).

    The log is append-only, so a kill or a full disk during an append leaves at most a torn
    line (and a later append may have been glued onto it): lines that are not whole step
    records are dropped with a note, never a reason to refuse the resume. Temp files of a
    rewrite that was killed are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(path.parent, of=path.name + ".")
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept, torn = [], 0
    for line in lines:
        try:
            record = json.loads(line)
            line_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            torn += bool(line.strip())
            continue
        if line_step <= step:
            kept.append(line)
    if torn:
        log(f"{path}: dropped {torn} torn line(s) (a write cut short by a kill or full disk)")
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class Stop:
    """Remembers a SIGTERM/SIGINT so the loop can save and exit at a step boundary; a second
    signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)

    def _note(self, signum, _frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log(f"signal {signum}: saving a checkpoint at the end of this step, then stopping")


def end_of_step(step: int, num_steps: int, args, stop: Stop, rt, save) -> int | None:
    """Checkpoint when due (every ``args.save_every``, at the end, or when stopping) and say
    whether the run stops here: the exit code (128+N for signal N, 0 for ``args.stop_at``),
    or None to go on. Every rank calls it: a signal seen by any rank stops them all at this
    step. ``save()`` writes the checkpoint."""
    from nanochat import runtime

    stopping = runtime.all_agree(bool(stop.signum), rt)
    stop_here = stopping or step == args.stop_at
    if stop_here or (args.save_every and step % args.save_every == 0) or step == num_steps:
        save()
    if stop_here and stop.signum:
        log(f"stopped at step {step} by signal {stop.signum}; resume with the same command")
        return 128 + stop.signum
    if stop_here:
        log(f"stopped at step {step} (--stop-at); run the same command to continue")
        return 0
    return None


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one step gave: its ``loss``, extra fields for the step log (``logged``; RL's mean
    ``reward``) and the numbers sent to wandb (``metrics``, the loop adds ``lrm``)."""

    loss: float
    logged: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """This run's steps so far (a resumed run counts from its resume): for the report."""

    started: float
    results: list[StepResult] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def median_step(self) -> str:
        times = sorted(self.step_times)
        return f"{1000 * times[len(times) // 2]:.0f} ms" if times else "n/a"

    def first_last_loss(self) -> str:
        if not self.results:
            return "n/a"
        return f"{self.results[0].loss:.4f} / {self.results[-1].loss:.4f}"


class Trainer:
    """One training stage's hooks. Before ``run``, a trainer sets ``name`` (the step log
    logs/<name>-<tag>.jsonl), ``tag``, ``num_steps``, ``rt``, ``wandb_run``, and what a
    checkpoint holds: ``ckpt_dir``, ``run_config``, ``model``, ``optimizer`` and ``position``
    (the data position: a loader, or RL's prompt order); ``start_or_resume`` sets
    ``start_step``. Every rank calls every hook; rank 0 alone logs and writes."""

    name = "train"
    eta_window = 20  # steps the ETA averages over
    bpb = None  # the latest val bits per byte, kept in the checkpoint's meta
    legacy_config = None  # run_config values a checkpoint older than their keys was made with

    def start_or_resume(self, policy: str):
        """Take the tag (its run lock and the --resume policy) and resume its checkpoint if
        there is one; sets ``start_step``, returns the checkpoint found or None."""
        from nanochat.training import run_state

        self.start_step, found = run_state.start_or_resume(
            self.ckpt_dir, policy, self.run_config, self.model, self.optimizer, self.position,
            self.rt, self.legacy_config,
        )  # fmt: skip
        return found

    def on_start(self) -> None:
        """Work before the first step, timed and stoppable like the steps (RL's first eval)."""

    def lr_multiplier(self, step: int) -> float:
        raise NotImplementedError

    def muon_momentum(self, step: int) -> float:
        """Muon's momentum at ``step`` (the classic ramp unless the trainer says otherwise)."""
        from nanochat.training import schedules

        return schedules.muon_momentum(step)

    def weight_decay_multiplier(self, step: int) -> float:
        """The share of each group's weight decay at ``step`` (all of it by default)."""
        return 1.0

    def before_step(self, step: int) -> None:
        """Evals due before step ``step`` is taken (the first call is at ``start_step``)."""

    def train_step(self, step: int) -> StepResult:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Evals due once ``step`` steps are done, before its checkpoint."""

    def progress(self, result: StepResult, lrm: float, seconds: float) -> str:
        """The step's progress line, before the ETA: loss, LR multiplier, time, and the
        trainer's ``progress_extra``."""
        line = f"loss {result.loss:.4f} | lrm {lrm:.3f} | {seconds * 1000:.0f} ms"
        extra = self.progress_extra(result, seconds)
        return f"{line} | {extra}" if extra else line

    def progress_extra(self, result: StepResult, seconds: float) -> str:
        return ""

    def save(self, step: int) -> None:
        """The checkpoint of this step (``run_state.save``)."""
        from nanochat.training import run_state

        run_state.save(
            self.ckpt_dir, step, self.run_config, self.model, self.optimizer, self.position,
            self.rt, self.bpb,
        )  # fmt: skip

    def finish(self, step: int, record: RunRecord) -> None:
        """The final evals and (rank 0) the report section."""


def run(trainer: Trainer, args, base: Path) -> int:
    """Train from ``trainer.start_step`` to ``trainer.num_steps``: 0 when done, or the exit
    code of a stop (``end_of_step``). ``args`` carries --save-every and --stop-at."""
    rt, optimizer, wandb_run = trainer.rt, trainer.optimizer, trainer.wandb_run
    num_steps = trainer.num_steps
    stop = Stop()
    log_path = base / "logs" / f"{trainer.name}-{trainer.tag}.jsonl"
    if rt.master:
        keep_log_until(log_path, trainer.start_step)
    bar = None
    if rt.master and sys.stdout.isatty():  # a progress bar at a terminal, log lines elsewhere
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=trainer.start_step, unit="step", dynamic_ncols=True)
    record = RunRecord(started=time.monotonic())
    trainer.on_start()
    step = trainer.start_step
    while step < num_steps:
        trainer.before_step(step)
        t0 = time.monotonic()
        lrm = trainer.lr_multiplier(step)
        set_schedule(
            optimizer, lrm, trainer.muon_momentum(step), trainer.weight_decay_multiplier(step)
        )
        result = trainer.train_step(step)
        step += 1
        dt = time.monotonic() - t0
        record.results.append(result)
        record.step_times.append(dt)
        if rt.master:
            append_step(log_path, step, result.loss, lrm, dt, **result.logged)
            recent = record.step_times[-trainer.eta_window :]
            eta = sum(recent) / len(recent) * (num_steps - step)
            # progress() may add figures to result.metrics (pretraining's tokens/s)
            line = f"{trainer.progress(result, lrm, dt)} | eta {eta / 60:.1f} min"
            if wandb_run:
                wandb_run.log({**result.metrics, "lrm": lrm}, step=step)
            if bar is not None:
                bar.set_postfix_str(line, refresh=False)
                bar.update(1)
            else:
                print(f"step {step:05d}/{num_steps} | {line}", flush=True)
        trainer.after_step(step)
        code = end_of_step(step, num_steps, args, stop, rt, lambda at=step: trainer.save(at))
        if code is not None:
            return code
    if bar is not None:
        bar.close()
    trainer.finish(step, record)
    return 0
