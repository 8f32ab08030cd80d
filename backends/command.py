"""Turn (stage, preset, knobs) into the one command every backend runs.

    torchrun --standalone --nproc_per_node=N -m scripts.X -- <args>   # multi-process stages
    torchrun --nnodes=2 --node_rank=R --master_addr=A --master_port=P \
             --nproc_per_node=N -m scripts.X -- <args>                 # NODES=2, on each node
    python -m scripts.X <args>                                         # one process or CPU

On several nodes torchrun's static rendezvous on node 0's address is used: NODE_RANK decides
which global ranks a node gets (node 0 holds ranks 0..N-1, so its terminal shows the progress
and its rank 0 writes the checkpoint's meta). torchrun's c10d rendezvous would ignore
--node_rank and number the nodes in the order they arrive.

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

DEFAULT_MASTER_PORT = 29500  # torchrun's own default


@dataclass(frozen=True)
class Nodes:
    """Where this node stands in a multi-node run (``count`` 1: a single node). On Modal the
    launcher knows only ``count``: each container fills in its ``rank`` and node 0's address
    from its cluster (``rank`` None until then; a dry run shows placeholders). A cluster
    file (``backends.cluster_files``) puts placeholders for the cluster's variables in."""

    count: int = 1
    rank: int | str | None = 0
    master_addr: str = ""
    master_port: int = DEFAULT_MASTER_PORT

    def torchrun_flags(self) -> list[str]:
        if self.count == 1:
            return ["--standalone"]
        return [
            f"--nnodes={self.count}",
            f"--node_rank={'<cluster rank>' if self.rank is None else self.rank}",
            f"--master_addr={self.master_addr or '<node 0 address>'}",
            f"--master_port={self.master_port}",
        ]


SINGLE_NODE = Nodes()


@dataclass(frozen=True)
class StageCommand:
    stage: Stage
    argv: list[str]
    env: dict[str, str]  # only what we set on top of the caller's environment
    nproc: int
    nodes: Nodes = SINGLE_NODE

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
    nodes: Nodes = SINGLE_NODE,
) -> StageCommand:
    """The stage's command; ``nodes`` only matters to a multi-process stage."""
    args = script_args(stage, preset, knobs)
    if not stage.multiprocess:
        nodes = SINGLE_NODE
    if stage.multiprocess and (nproc > 1 or nodes.count > 1):
        argv = [
            "torchrun",
            *nodes.torchrun_flags(),
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
    return StageCommand(
        stage=stage, argv=argv, env=env, nproc=nproc if stage.multiprocess else 1, nodes=nodes
    )
