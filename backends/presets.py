"""Presets: named sets of knob defaults. They differ only in flags, never in stages.

A knob the user sets wins over the preset; a knob neither sets is left to the stage
script's own default (so every default is defined once). Stage-specific flags per preset
live in the stage table (backends/stages.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nanochat.common import UsageError

DEFAULT_PRESET = "tiny"


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    knobs: dict[str, object] = field(default_factory=dict)
    # A preset that refines another: its knobs start from that one's, and each stage gets
    # that preset's flags first, then this one's (argparse keeps the last occurrence).
    extends: str | None = None

    def chain(self) -> tuple[str, ...]:
        """This preset's lineage, oldest first: ("tiny", "smoke") for smoke."""
        return (*PRESETS[self.extends].chain(), self.name) if self.extends else (self.name,)


# GPU=cpu: on Modal, tiny runs in CPU containers (a cheap remote smoke test).
TINY_KNOBS = {
    "dataset": "embedded",
    "depth": 4,
    "gpus": 1,
    "device_batch": 16,
    "run": "dummy",
    "gpu": "cpu",
}


@dataclass(frozen=True)
class PretrainRecipe:
    """What a GPU preset's pretraining runs, said explicitly: the depth, the data:params
    ratio, fp8 matmuls and the attention window pattern. The pretrain stage's flags, the
    shards to download and the price all follow from this one row (a knob the user sets
    still wins: DEPTH=26 trains and prices d26)."""

    depth: int
    ratio: float
    fp8: bool
    window_pattern: str

    def flags(self) -> tuple[str, ...]:
        return (
            f"--ratio={self.ratio:g}",
            *(("--fp8",) if self.fp8 else ()),
            f"--window-pattern={self.window_pattern}",
        )

    def shards(self, dataset: str) -> int:
        """Training shards that hold the planned tokens with a quarter to spare."""
        from nanochat.data.dataset import REMOTE_DATASETS
        from nanochat.model import dial

        the_dial = dial.plan(self.depth, dial.DEFAULT_VOCAB, dial.SEQ_LEN, 1, 1, self.ratio)
        return math.ceil(SHARD_MARGIN * the_dial.tokens / REMOTE_DATASETS[dataset].tokens_per_shard)


SHARD_MARGIN = 1.25
# quick: the seed's d12 check. speedrun: the seed's d20 at ratio 12. gpt2: GPT-2 grade CORE
# as upstream reached it in 2026 (d24, ratio 8, fp8 tensorwise on H100). Window patterns
# follow the ablation (docs/benchmarks.md, "The 2026 recipe").
PRETRAIN_RECIPES = {
    "quick": PretrainRecipe(depth=12, ratio=12, fp8=False, window_pattern="L"),
    "speedrun": PretrainRecipe(depth=20, ratio=12, fp8=False, window_pattern="L"),
    "gpt2": PretrainRecipe(depth=24, ratio=8, fp8=True, window_pattern="L"),
}


def _gpu_knobs(name: str, gpu: str, **more) -> dict[str, object]:
    recipe = PRETRAIN_RECIPES[name]
    shards = recipe.shards("climbmix")
    return {"dataset": "climbmix", "shards": shards, "depth": recipe.depth, "gpu": gpu, **more}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            "CPU, offline, embedded corpus: the whole pipeline in minutes on 2 cores",
            TINY_KNOBS,
        ),
        Preset(
            "smoke",
            "tiny at the fewest steps that still run every stage (~1 min on 2 cores): a "
            "first check of a machine or backend; the tests run it",
            # half tiny's rows per micro-batch: pretraining's 4096 tokens a step are then
            # 2 micro-batches, so GPUS=2 or NODES=2 runs it too, one micro-batch a process
            {**TINY_KNOBS, "device_batch": 8},
            extends="tiny",
        ),
        Preset(
            "quick",
            "d12 on ClimbMix: the seed's quick test (~1 h on 4 GPUs)",
            _gpu_knobs("quick", "A100-80GB:4"),
        ),
        Preset("speedrun", "d20: the seed's default speedrun", _gpu_knobs("speedrun", "H100:8")),
        Preset(
            "gpt2",
            "d24 at ratio 8 with fp8: GPT-2 grade CORE",
            _gpu_knobs("gpt2", "H100:8", device_batch=16),
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
