"""Turn (stage, preset, knobs) into the one command every backend runs.

    torchrun --standalone --nproc_per_node=N -m scripts.X -- <args>   # multi-process stages
    python -m scripts.X <args>                                         # one process or CPU

The local backend runs it directly, docker inside the image, Modal inside the container:
the string is the same everywhere.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backends.knobs import KNOBS_BY_NAME
from backends.presets import get_preset
from backends.stages import Stage
from nanochat.common import BASE_DIR_ENV


@dataclass(frozen=True)
class StageCommand:
    stage: Stage
    argv: list[str]
    env: dict[str, str]  # only what we set on top of the caller's environment
    nproc: int

    def shell(self) -> str:
        return shlex.join(self.argv)


def script_args(stage: Stage, preset: str, knobs: Mapping[str, object]) -> list[str]:
    """Knob flags in the stage's order, then the preset's extra flags (those of the preset it
    extends first), then ARGS verbatim
    (last, so a flag in ARGS overrides: argparse keeps the last occurrence)."""
    args = [
        f"{KNOBS_BY_NAME[name].flag}={knobs[name]}"
        for name in stage.knobs
        if knobs.get(name) is not None
    ]
    for name in get_preset(preset).chain():
        args += stage.preset_args.get(name, ())
    args += shlex.split(str(knobs.get("args") or ""))
    return args


def build(
    stage: Stage,
    preset: str,
    knobs: Mapping[str, object],
    nproc: int,
    base_dir: Path,
    omp_threads: int,
) -> StageCommand:
    args = script_args(stage, preset, knobs)
    if stage.multiprocess and nproc > 1:
        argv = [
            "torchrun",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            stage.module,
            "--",
            *args,
        ]
    else:
        argv = ["python", "-m", stage.module, *args]
    env = {BASE_DIR_ENV: str(base_dir)}
    # torchrun sets OMP_NUM_THREADS=1 itself; we set it everywhere so one process per GPU
    # does not oversubscribe the CPU. A value the user exported wins.
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(omp_threads)
    return StageCommand(stage=stage, argv=argv, env=env, nproc=nproc if stage.multiprocess else 1)
