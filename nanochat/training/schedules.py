"""The per-step schedules of training: learning rate, Muon momentum and weight decay.

Where it fits: the one training loop (``nanochat.training.train_loop``) asks its trainer for
the three multipliers of each step and writes them into the optimizer's groups before the
step (``lr = initial_lr * lr_multiplier``, ``momentum``, ``weight_decay = initial_wd *
weight_decay_multiplier``). Pure arithmetic on step numbers, no torch. Facts (upstream
nanochat, 2026): linear warmup over 40 steps, flat, linear warmdown over the last 65% to 5%;
where warmup and warmdown overlap (a short run) the warmup wins; Muon's momentum ramps 0.85 ->
0.97 over 400 steps and falls back to 0.90 during the warmdown ("cycle"; the ramp wins while
it lasts), or the older ramp 0.85 -> 0.95 over 300 steps and flat ("ramp"); the cautious
weight decay follows a cosine from its full value at step 0 to 0 at the last step.
"""

from __future__ import annotations

import math

WARMUP_STEPS = 40
WARMDOWN_FRACTION = 0.65
FINAL_LR_FRACTION = 0.05
MOMENTUM_SCHEDULES = ("ramp", "cycle")


def lr_scale_for_passes(scale: float, passes: float) -> float:
    """An LR boost fitted for one pass over the data, for a run of ``passes`` passes:
    ``scale / passes ** 2`` (the boost as asked up to one pass). A scale of 1 or less is
    kept as it is. Measured at d4 on the embedded corpus (docs/benchmarks.md, "The 2026
    recipe"): x4 is best for one pass; over three, with the default features, x4, x2, x1.33
    and x1 all memorize the data (val bpb ends 0.18-0.5 above its best); the features fit
    faster and memorize faster."""
    if scale <= 1 or passes <= 1:
        return scale
    return scale / passes**2


def warmdown_start(total_steps: int, warmdown_frac: float = WARMDOWN_FRACTION) -> int:
    """The first step of the warmdown: the last ``warmdown_frac`` of the run."""
    return total_steps - round(warmdown_frac * total_steps)


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int = WARMUP_STEPS,
    warmdown_frac: float = WARMDOWN_FRACTION,
    final_frac: float = FINAL_LR_FRACTION,
) -> float:
    """Linear warmup to 1, flat, then linear warmdown to ``final_frac`` at ``total_steps``.

    Warmup: (step + 1) / warmup_steps, so step 0 already moves, and a step inside the
    warmup takes it even where the warmdown has begun (a run shorter than the two ramps).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_frac * total_steps)
    left = total_steps - step
    if warmdown_steps <= 0 or left >= warmdown_steps:
        return 1.0
    progress = max(left, 0) / warmdown_steps
    return progress + (1 - progress) * final_frac


def muon_momentum(step: int, total_steps: int | None = None, schedule: str = "ramp") -> float:
    """Muon's momentum at ``step``.

    "ramp": linear 0.85 -> 0.95 over 300 steps, then flat. "cycle" (needs ``total_steps``):
    linear 0.85 -> 0.97 over 400 steps, flat, then linear 0.97 -> 0.90 across the warmdown;
    while the ramp lasts it wins over the warmdown.
    """
    if schedule == "ramp":
        return 0.85 + min(step / 300, 1.0) * (0.95 - 0.85)
    if schedule != "cycle":
        raise ValueError(f"momentum schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")
    if total_steps is None:
        raise ValueError("the cycle momentum schedule needs the run's total steps")
    if step < 400:
        return 0.85 + step / 400 * (0.97 - 0.85)
    start = warmdown_start(total_steps)
    if step < start:
        return 0.97
    progress = min((step - start) / max(total_steps - start, 1), 1.0)
    return 0.97 + progress * (0.90 - 0.97)


def weight_decay_multiplier(step: int, total_steps: int) -> float:
    """Cosine from 1 at step 0 to 0 at ``total_steps``."""
    return 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
