"""The pretraining recipe's switches: each model and optimizer feature, its flag and its default.

Where it fits: ``scripts.base_train`` adds these flags (``add_arguments``) and turns them into
the model's ``GPTConfig`` fields (``model_options``), the optimizer's options
(``optimizer_options``) and the schedules; the chat stages take the optimizer defaults
(``optimizer_defaults``); ``scripts.ablate`` toggles them one at a time to measure each
(docs/benchmarks.md, "The 2026 recipe"). This table is the one place the recipe's defaults
live (GPTConfig's and build_optimizer's own defaults are the plain model and optimizer: every
extra off). A feature is on by default only where the ablation measured a win beyond the
spread of three seeds: smear, value embeddings and SSSL windows (d4, one epoch: -0.024,
-0.011, -0.016 val bpb; together -0.04). The GPU presets still say their window pattern
(backends/presets.py). Torch-free: the launcher reads these flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from nanochat.common import non_negative_float
from nanochat.training.schedules import MOMENTUM_SCHEDULES


@dataclass(frozen=True)
class Switch:
    """One on/off feature: ``--name`` / ``--no-name``."""

    name: str  # the flag without dashes, underscores for dashes
    default: bool
    help: str
    target: str  # "model" (a GPTConfig field) or "optimizer" (a build_optimizer option)


SWITCHES = (
    Switch("value_embeds", True, "value embeddings on alternating layers (ResFormer)", "model"),
    Switch("residual_scalars", False, "per-layer residual and x0 scalars", "model"),
    Switch("smear", True, "mix the previous token's embedding in through a gate", "model"),
    Switch("backout", False, "subtract a learned share of the middle residual", "model"),
    Switch("normuon", False, "NorMuon variance reduction after Muon's iteration", "optimizer"),
    Switch("muon_eq", False, "MuonEq row equilibration and Muon+ renormalisation", "optimizer"),
)
WINDOW_PATTERN = "SSSL"  # S: a quarter of the context, L: all of it; the last layer is L
WEIGHT_DECAY = 0.0  # cautious decay of the Muon matrices at d12 and 2^19 tokens (scaled)
MOMENTUM = "ramp"  # Muon momentum schedule (nanochat.training.schedules)
ADAM_BETA_CHOICES = ("classic", "split")  # split: the head (0.8, 0.96), embeddings (0.8, 0.995)
ADAM_BETAS = "classic"
# What a checkpoint saved before these switches existed was trained with: every switch off,
# no decay, the ramp, classic betas, full attention (a resume fills its missing keys so).
LEGACY = {
    "window_pattern": "L",
    **{switch.name: False for switch in SWITCHES},
    "adam_betas": "classic",
    "weight_decay": 0.0,
    "momentum": "ramp",
}


def window_pattern(text: str) -> str:
    """A --window-pattern value: S and L only (argparse turns the error into one line)."""
    if not text or set(text.upper()) - {"S", "L"}:
        raise argparse.ArgumentTypeError(
            f"must be letters S (a quarter of the context) and L (all of it), got {text!r}"
        )
    return text.upper()


def as_flags(config: dict) -> tuple[str, ...]:
    """base_train's flags that set these recipe values (``as_config``'s keys)."""
    flags = []
    for key, value in config.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags.append(f"--{name}={value}")
    return tuple(flags)


def add_arguments(p: argparse.ArgumentParser, schedules: bool = True) -> None:
    """The recipe's flags on a parser; ``schedules=False`` leaves out the per-step ones
    (--weight-decay's schedule and --momentum: a one-step benchmark has none)."""
    group = p.add_argument_group("recipe (defaults: see docs/benchmarks.md, The 2026 recipe)")
    for switch in SWITCHES:
        group.add_argument(
            f"--{switch.name.replace('_', '-')}",
            action=argparse.BooleanOptionalAction,
            default=switch.default,
            help=f"{switch.help} (default {'on' if switch.default else 'off'})",
        )
    group.add_argument(
        "--window-pattern",
        type=window_pattern,
        default=WINDOW_PATTERN,
        help=f"attention windows tiled over the layers, S = a quarter of the context, "
        f"L = all; the last layer is always L (default {WINDOW_PATTERN})",
    )
    group.add_argument(
        "--adam-betas",
        choices=ADAM_BETA_CHOICES,
        default=ADAM_BETAS,
        help="classic = (0.8, 0.95) everywhere; split = the head (0.8, 0.96), the "
        f"embeddings (0.8, 0.995) (default {ADAM_BETAS})",
    )
    if not schedules:
        return
    group.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=WEIGHT_DECAY,
        help="cautious weight decay of the Muon matrices at d12 and 2^19 tokens per step, "
        "scaled to the depth and batch and cosine-decayed to 0 over the run "
        f"(default {WEIGHT_DECAY:g})",
    )
    group.add_argument(
        "--momentum",
        choices=MOMENTUM_SCHEDULES,
        default=MOMENTUM,
        help="Muon momentum: ramp = 0.85 -> 0.95 over 300 steps; cycle = 0.85 -> 0.97 over "
        f"400 steps, back to 0.90 in the warmdown (default {MOMENTUM})",
    )


def model_options(args) -> dict:
    """The GPTConfig fields the flags set."""
    options = {s.name: getattr(args, s.name) for s in SWITCHES if s.target == "model"}
    return {"window_pattern": args.window_pattern, **options}


def optimizer_options(args) -> dict:
    """``build_optimizer``'s options the flags set (the weight decay is scaled separately)."""
    options = {s.name: getattr(args, s.name) for s in SWITCHES if s.target == "optimizer"}
    return {"adam_betas": args.adam_betas, **options}


def optimizer_defaults() -> dict:
    """``build_optimizer``'s options as the recipe's defaults set them (the chat stages,
    which have no recipe flags of their own)."""
    options = {s.name: s.default for s in SWITCHES if s.target == "optimizer"}
    return {"adam_betas": ADAM_BETAS, **options}


def describe(args) -> str:
    """One line: what this run's recipe turns on."""
    on = [s.name for s in SWITCHES if getattr(args, s.name)]
    return (
        f"recipe: windows {args.window_pattern}, weight decay {args.weight_decay:g}, "
        f"momentum {args.momentum}, adam betas {args.adam_betas}, "
        f"features: {', '.join(on) or 'none'}"
    )


def as_config(args) -> dict:
    """Every recipe setting of a run (its checkpoints record it; a resume must match)."""
    return {
        **model_options(args),
        **optimizer_options(args),
        "weight_decay": args.weight_decay,
        "momentum": args.momentum,
    }
