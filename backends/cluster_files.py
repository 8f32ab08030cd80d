"""Launch files for clusters we do not drive ourselves: a SkyPilot task and a Slurm batch script.

Part of the launcher (tasks.py -> backends -> scripts). ``make skypilot-task`` and
``make slurm-script`` take a multi-GPU stage (STAGE=pretrain by default) with the usual knobs
and write one file that runs the stage's own torchrun command on every node of a NODES>1
job, the node's rank and node 0's address filled in by the cluster:

- SkyPilot (``sky launch -c nanochat nanochat-pretrain-2nodes.sky.yaml``): ``num_nodes``,
  the image (docker/Dockerfile's, pushed where the cloud can pull it: IMAGE=...), a bucket
  mounted as BASE_DIR on every node (BUCKET=..., or given at launch), and
  ``SKYPILOT_NODE_RANK`` / the first line of ``SKYPILOT_NODE_IPS`` as ``--node_rank`` /
  ``--master_addr``;
- Slurm (``sbatch nanochat-pretrain-2nodes.sbatch``): one task per node, ``srun`` around the
  same command, ``SLURM_NODEID`` as the rank and the first host of the allocation as node 0;
  BASE_DIR must be a folder every node sees (NFS, Lustre).

Both resume: a preempted or requeued job runs the same command, which continues from the
last complete checkpoint (``--resume=auto``), on as many nodes as it gets when the batch
still divides (``nanochat.training.run_state.reshard``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from backends import command
from backends.docker_image import WORKDIR, image_tag
from backends.knobs import check_raw
from backends.planning import CONTAINER_BASE_DIR, explain_lines, plan, resolve_base_dir
from backends.stages import gpu_count, remote_gpu
from nanochat.common import UsageError, atomic_write_text

KINDS = ("skypilot", "slurm")
DEFAULT_GPU = "H100:8"
SUFFIX = {"skypilot": ".sky.yaml", "slurm": ".sbatch"}
# Placeholders the command is built with, then swapped for the cluster's variables (shell
# syntax: the command runs under bash on every node).
RANK, ADDR = "@NODE_RANK@", "@MASTER_ADDR@"


def cluster_command(stage_name: str, knobs: dict, base: Path) -> tuple[command.StageCommand, str]:
    """The stage's command for one node of the job, with placeholders for the node's rank and
    node 0's address, and the accelerator string (GPU, default H100:8). Every knob is
    checked as for a run (one-line UsageError)."""
    given = check_raw(knobs)
    nodes = int(given.get("nodes") or 1)
    if nodes < 2:
        raise UsageError("a cluster file is for a multi-node run: give NODES=2 or more")
    for name in ("node_rank", "master_addr"):
        if name in given:
            raise UsageError(f"{name.upper()} is set by the cluster on each node: leave it out")
    if given.get("backend", "local") != "local":
        raise UsageError("a cluster file runs the stage on the cluster's nodes: leave BACKEND out")
    # Checked as a local dry run of node 0 (the cluster fills in the real rank and address).
    probe = plan(stage_name, quiet=True, **{**knobs, "node_rank": 0, "master_addr": "node0",
                                             "dry_run": True})  # fmt: skip
    gpu = remote_gpu(probe.stage, given.get("gpu") or DEFAULT_GPU)
    if gpu is None:
        raise UsageError("a cluster file needs GPU nodes: GPU=H100:8 or the like, not cpu")
    nproc = int(given.get("gpus") or gpu_count(gpu))
    if nproc > gpu_count(gpu):
        raise UsageError(f"GPUS={nproc} but a node has {gpu_count(gpu)} GPU(s) (GPU={gpu})")
    port = int(given.get("master_port") or command.DEFAULT_MASTER_PORT)
    the_nodes = command.Nodes(nodes, RANK, ADDR, port)
    cmd = command.build(probe.stage, probe.preset, probe.knobs, nproc, base, 1, the_nodes)
    check_divides(cmd, nproc * nodes)
    return cmd, gpu


def check_divides(cmd: command.StageCommand, processes: int) -> None:
    """The stage's own dry-run check at the job's process count (pretraining: the batch must
    divide over every process), as a UsageError: a job that would stop with it after the
    nodes are allocated is never written."""
    args = cmd.argv[cmd.argv.index("--") + 1 :]
    for line in explain_lines(cmd.stage, args, processes, CONTAINER_BASE_DIR):
        if line.startswith("warning: "):
            raise UsageError(line.removeprefix("warning: "))


def _shell(cmd: command.StageCommand, rank: str, addr: str) -> str:
    return cmd.shell().replace(RANK, rank).replace(ADDR, addr)


def _block_dumper():
    import yaml

    class BlockDumper(yaml.SafeDumper):
        """Multi-line strings (the run script) as YAML block literals, as people write them."""

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    BlockDumper.add_representer(str, text)
    return BlockDumper


def skypilot_task(
    stage_name: str, knobs: dict, image: str | None = None, bucket: str | None = None
) -> str:
    """A SkyPilot task (YAML) running the stage on NODES nodes of GPU, BASE_DIR in
    ``bucket`` (None: SkyPilot asks for it at launch, ``--env NANOCHAT_BUCKET=...``)."""
    import yaml

    _BlockDumper = _block_dumper()
    cmd, gpu = cluster_command(stage_name, knobs, CONTAINER_BASE_DIR)
    image = image or image_tag()
    run = "\n".join(
        [
            "set -euo pipefail",
            # sed reads every line: `head -n1` could end the pipe early (SIGPIPE, pipefail)
            'MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | sed -n 1p)"',
            f"cd {WORKDIR}",
            *(f"export {k}={shlex.quote(v)}" for k, v in cmd.env.items()),
            _shell(cmd, '"$SKYPILOT_NODE_RANK"', '"$MASTER_ADDR"'),
        ]
    )
    task = {
        "name": f"nanochat-{stage_name}",
        "num_nodes": cmd.nodes.count,
        "resources": {"accelerators": gpu, "image_id": f"docker:{image}"},
        "envs": {"NANOCHAT_BUCKET": bucket},
        # BASE_DIR on every node: one bucket, so node 0's checkpoint meta and every node's
        # optimizer shards land in the same place (the run resumes from it after a preemption)
        "file_mounts": {
            str(CONTAINER_BASE_DIR): {"name": "${NANOCHAT_BUCKET}", "mode": "MOUNT_CACHED"}
        },
        "run": run + "\n",
    }
    header = (
        f"# SkyPilot task: nanochat {stage_name} on {cmd.nodes.count} nodes of {gpu}.\n"
        f"# Written by `make skypilot-task`; launch: sky launch -c nanochat <this file>\n"
        f"# IMAGE ({image}) must be pushed where the cloud can pull it (IMAGE=...);\n"
        "# NANOCHAT_BUCKET: your bucket, mounted as BASE_DIR on every node (BUCKET=... here,\n"
        "# or sky launch --env NANOCHAT_BUCKET=...; SkyPilot refuses to launch without one)\n"
        "# Each node runs the same torchrun command with its SKYPILOT_NODE_RANK; node 0 is the\n"
        "# first of SKYPILOT_NODE_IPS. docs/multinode.md\n"
    )
    return header + yaml.dump(task, Dumper=_BlockDumper, sort_keys=False, width=1000)


def slurm_script(stage_name: str, knobs: dict, base: Path) -> str:
    """An sbatch script running the stage on NODES nodes, BASE_DIR shared by all of them."""
    cmd, gpu = cluster_command(stage_name, knobs, base)
    nodes, per_node = cmd.nodes.count, cmd.nproc
    stage = cmd.stage
    hours = int(stage.timeout_h)
    node_command = _shell(cmd, "$SLURM_NODEID", "$MASTER_ADDR")
    lines = [
        "#!/bin/bash",
        f"# nanochat {stage_name} on {nodes} nodes x {per_node} GPUs (`make slurm-script`).",
        "# Submit it from the repository (set up there with `make setup`): sbatch <this file>",
        f"# BASE_DIR ({base}) must be the same shared folder on every node. docs/multinode.md",
        f"#SBATCH --job-name=nanochat-{stage_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={hours:02d}:00:00",
        f"#SBATCH --output=nanochat-{stage_name}-%j.log",
        "# a preempted job is requeued and resumes from its last checkpoint; SIGTERM 2 min",
        "# before the time limit makes the run save at the end of its step and stop, if step",
        "# and save fit in the 30 s torchrun gives its workers after a signal",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@120",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        "# node 0: the allocation's first host (sed reads every line: no SIGPIPE under pipefail)",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        "export MASTER_ADDR",
        'export PATH="$PWD/.venv/bin:$PATH"',
        *(f"export {k}={shlex.quote(v)}" for k, v in cmd.env.items()),
        "# one task per node; single quotes: each node expands its own SLURM_NODEID",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('exec ' + node_command)}",
    ]
    return "\n".join(lines) + "\n"


WRITTEN_BY = {"skypilot": "make skypilot-task", "slurm": "make slurm-script"}


def check_out(path: Path, kind: str) -> None:
    """Where the file goes: in an existing folder, and never over a file this command did
    not write (rewriting its own file, e.g. with other knobs, is what a rerun is for)."""
    if path.is_dir():
        raise UsageError(f"OUT={path} is a folder: name the file to write")
    if not path.parent.is_dir():
        raise UsageError(f"OUT={path}: the folder {path.parent} does not exist")
    if path.exists():
        try:
            head = path.read_text(errors="replace")[:400]
        except OSError as exc:
            raise UsageError(f"OUT={path} cannot be read ({exc})") from None
        if WRITTEN_BY[kind] not in head:
            raise UsageError(
                f"OUT={path} exists and was not written by {WRITTEN_BY[kind]}: "
                "choose another OUT, or move that file away"
            )


def write(kind: str, stage_name: str = "pretrain", out: str | None = None,
          image: str | None = None, bucket: str | None = None, **knobs: object) -> int:  # fmt: skip
    """``make skypilot-task`` / ``make slurm-script``: write the file (or with DRY_RUN=1
    print it) and say how to launch it."""
    if kind not in KINDS:
        raise UsageError(f"unknown cluster file {kind!r}; choose one of: {', '.join(KINDS)}")
    for name, value in (("STAGE", stage_name), ("OUT", out), ("IMAGE", image), ("BUCKET", bucket)):
        if value is not None and not str(value).strip():
            raise UsageError(f"{name} is empty: give it a value, or leave it out")
    dry_run = bool(check_raw({"dry_run": knobs.get("dry_run")}).get("dry_run"))
    knobs = {k: v for k, v in knobs.items() if v is not None and v is not False}
    knobs.pop("dry_run", None)
    if kind == "skypilot":
        text = skypilot_task(stage_name, knobs, image, bucket)
    else:
        text = slurm_script(stage_name, knobs, resolve_base_dir(knobs.get("base_dir")))
    if dry_run:
        sys.stdout.write(text)
        return 0
    nodes = int(str(knobs["nodes"]))
    path = Path(out or f"nanochat-{stage_name}-{nodes}nodes{SUFFIX[kind]}").absolute()
    check_out(path, kind)
    atomic_write_text(path, text)
    launch = "sky launch -c nanochat" if kind == "skypilot" else "sbatch"
    print(f"[nanochat] wrote {path}; launch it with: {launch} {path.name}")
    return 0
