"""Presets: named sets of knob defaults. They differ only in flags, never in stages.

A knob the user sets wins over the preset; a knob neither sets is left to the stage
script's own default (so every default is defined once). Stage-specific flags per preset
live in the stage table (backends/stages.py).
"""

from __future__ import annotations

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
            TINY_KNOBS,
            extends="tiny",
        ),
        Preset(
            # d12 at ratio 12 trains ~1.3B tokens: 29 shards of ~46M (nanochat.data.dataset);
            # 32 leaves a margin (tests/unit/test_presets.py checks every preset's shards).
            "quick",
            "d12 on 32 ClimbMix shards: the seed's quick test (~1 h on 4 GPUs)",
            {"dataset": "climbmix", "shards": 32, "depth": 12, "gpu": "A100-80GB:4"},
        ),
        Preset(
            # d20 at the default params:data ratio of 12 needs ~5.2B tokens, about 114
            # ClimbMix shards of ~46M tokens each; 150 leaves a margin.
            "speedrun",
            "d20: the seed's default speedrun (~4 h on 8 GPUs)",
            {"dataset": "climbmix", "shards": 150, "depth": 20, "gpu": "H100:8"},
        ),
        Preset(
            # d24 at ratio 8 with fp8 (the pretrain stage's gpt2 flags) needs ~5.8B tokens,
            # ~127 shards; ~150 suffice for GPT-2 grade upstream, 170 leaves a
            # margin.
            "gpt2",
            "d24, GPT-2 grade CORE",
            {
                "dataset": "climbmix",
                "shards": 170,
                "depth": 24,
                "device_batch": 16,
                "gpu": "H100:8",
            },
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
