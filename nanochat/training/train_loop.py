"""The pieces every training stage shares: one optimizer step with gradient accumulation,
the per-step JSONL log that resumes cleanly, and the end of a step (checkpoint when due,
stop cleanly on SIGTERM/SIGINT or --stop-at).

Pretraining (scripts.base_train), midtraining and SFT (scripts.mid_train, scripts.chat_sft)
and RL (scripts.chat_rl) differ in their data, schedules and evals, not in how a step is
taken, logged or ended, so those live here once. The step log (logs/<stage>-<tag>.jsonl)
feeds the report card's plots.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch

from nanochat import runtime
from nanochat.common import atomic_write_text, log, sweep_temp_files
from nanochat.training import optim


def set_schedule(optimizer, step: int, lr_multiplier: float) -> None:
    """Every group's LR from its initial LR; Muon's momentum from its ramp."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        if group.get("kind") == "muon":
            group["momentum"] = optim.muon_momentum(step)


def train_step(forward, model, optimizer, loader, accumulation: int, runtime) -> float:
    """Forward/backward over ``accumulation`` micro-batches, one optimizer step; the mean
    loss of the step (one host sync per step)."""
    total = torch.zeros((), device=runtime.device)
    for _ in range(accumulation):
        inputs, targets = loader.next_batch()
        with runtime.autocast():
            loss = forward(inputs, targets)
        (loss / accumulation).backward()
        total += loss.detach() / accumulation
    optimizer.step()
    model.zero_grad(set_to_none=True)
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
