"""What ``make help`` prints, and the lists the Makefile reads, all from the tables.

    python3 -m backends.catalog            # the help page
    python3 -m backends.catalog stages     # stage names, one line (Makefile targets)
    python3 -m backends.catalog make-flags # VAR=flag=kind triples (Makefile -> invoke flags)

Standard library only: ``make help`` works before ``make setup``.
"""

from __future__ import annotations

import sys

from backends.knobs import KNOBS
from backends.presets import DEFAULT_PRESET, PRESETS
from backends.stages import STAGES

OTHER_TARGETS = (
    ("speedrun", "every stage in order, skipping complete ones (RL=1 adds RL, FORCE= reruns)"),
    ("docker-build", "build the image of docker/Dockerfile (tagged by a hash of its inputs)"),
    ("docker-shell", "interactive shell in the image: GPUs, BASE_DIR at /data/nanochat"),
    ("volume-ls", "list the Modal volumes; PATH=base_checkpoints narrows it"),
    ("volume-get", "download from the Modal volumes: PATH=report DEST=./out"),
    ("skypilot-task", "write a SkyPilot task for NODES=2+ (STAGE=pretrain IMAGE= BUCKET= OUT=)"),
    ("slurm-script", "write an sbatch script for NODES=2+ (STAGE=pretrain, OUT=)"),
    ("browser", "install Debian's chromium for the web page test (make test does this)"),
    ("setup", "create .venv and install the project (every target does this when needed)"),
    ("test", "run the test suite (CPU, offline)"),
    ("lint", "ruff check + format check"),
    ("bench", "time a training step: ARGS='--depth=20 --record' (docs/benchmarks.md)"),
    ("bench-engine", "time inference: first token, tokens/s at batch 1 and 8 (--record)"),
    ("ablate", "ablate the recipe on the CPU, 3 seeds per cell (hours; --table prints it)"),
    ("lock", "re-resolve uv.lock (the image's pins) after changing dependencies"),
    ("help", "this page"),
)


def help_text() -> str:
    lines = [
        "nanochat: train your own ChatGPT. The same command runs on every backend.",
        "",
        "usage: make <stage> [KNOB=value ...]    (the same as: invoke <stage> --knob value)",
        "",
        "Stages, in pipeline order (hardware: cpu | gpu = one GPU | gpus = GPUS processes):",
    ]
    for stage in STAGES:
        todo = "" if stage.implemented() else "  [not implemented yet]"
        lines.append(f"  {stage.name:<15} {stage.hardware:<5} {stage.summary}{todo}")
    lines += ["", "Other targets:"]
    lines += [f"  {name:<15} {text}" for name, text in OTHER_TARGETS]
    lines += ["", "Knobs:"]
    for knob in KNOBS:
        value = "1" if knob.kind == "bool" else "..."
        lines.append(f"  {knob.make_var + '=' + value:<18} {knob.help}")
    lines += ["", f"Presets (PRESET=..., default {DEFAULT_PRESET}):"]
    for preset in PRESETS.values():
        knobs = " ".join(f"{k.upper()}={v}" for k, v in preset.knobs.items())
        lines.append(f"  {preset.name:<10} {preset.summary}")
        lines.append(f"  {'':<10} {knobs}")
    lines += [
        "",
        "Examples:",
        "  make tokenizer PRESET=tiny                      # embedded corpus + BPE, offline",
        "  make pretrain DEPTH=12 GPUS=8 DRY_RUN=1         # print the exact torchrun command",
        "  make download PRESET=speedrun                   # 142 ClimbMix shards + validation",
        "  make tokenizer BACKEND=docker DRY_RUN=1         # the same command, in the image",
        "  make speedrun PRESET=speedrun BACKEND=modal DETACH=1   # on Modal, laptop-free",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "help"
    if what == "stages":
        print(" ".join(stage.name for stage in STAGES))
    elif what == "make-flags":
        print(" ".join(f"{k.make_var}={k.flag}={k.kind}" for k in KNOBS))
    elif what == "help":
        print(help_text())
    else:
        print(f"error: unknown listing {what!r} (stages, make-flags, help)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
