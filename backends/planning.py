"""The plan of a run: check every input, resolve the knobs, say what will run and where.

Part of the launcher (tasks.py -> backends -> scripts), for every stage of the pipeline
(data -> tokenizer -> pretrain -> eval -> midtrain -> SFT -> RL -> chat/serve). All checks
happen here, before anything runs or is written; each failure is a ``UsageError`` that the
front ends (tasks.py, make) print as one line and turn into exit code 2.

A ``Plan`` is everything a backend needs: the stage, the resolved knobs, the command as it
runs inside the backend (``python -m ...`` / ``torchrun ...``, the same string everywhere)
and, for Modal, the GPU string. Each backend module offers ``describe(plan)`` (what a dry
run prints) and ``execute(plan)`` (the exit code); ``backends/launch.py`` runs the plans.
Backend modules that need an SDK (docker, modal) are imported only when chosen, so the
launcher stays light.

``make speedrun`` is the entries of ``stages.SPEEDRUN`` as plans: complete ones skipped
unless FORCE names them or an earlier entry (forced training stages get
NANOCHAT_RESUME=never), and where it helps the download split in two, the rest of the
shards fetched in the background while the tokenizer trains.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from backends import command, local, stages
from backends.knobs import CHECKPOINT_SOURCES, KNOBS_BY_NAME, check_raw
from backends.presets import DEFAULT_PRESET, get_preset
from backends.secrets import load_secrets
from backends.stages import (
    CLUSTER_SIZES,
    GPUS_PER_CLUSTER_NODE,
    SPEEDRUN_KNOBS,
    TOKENIZER_SHARDS,
    SpeedrunEntry,
    Stage,
    get_stage,
    gpu_count,
    remote_gpu,
    remote_resources,
    remote_threads,
    trains,
)
from nanochat.common import BASE_DIR_ENV, DEFAULT_BASE_DIR, RESUME_ENV, UsageError

# Knobs that shape how a stage runs rather than becoming one of its flags.
RUNNER_KNOBS = (
    "backend",
    "preset",
    "gpus",
    "gpu",
    "nodes",
    "node_rank",
    "master_addr",
    "master_port",
    "base_dir",
    "args",
    "dry_run",
    "detach",
)
NODE_KNOBS = ("nodes", "node_rank", "master_addr", "master_port")
# Where BASE_DIR lives inside the image (docker bind mount, Modal volumes); the Dockerfile
# sets NANOCHAT_BASE_DIR to the same path.
CONTAINER_BASE_DIR = Path("/data/nanochat")
BACKEND_MODULES = {
    "local": "backends.local",
    "docker": "backends.docker_backend",
    "modal": "backends.modal_backend",
}


@dataclass(frozen=True)
class Plan:
    stage: Stage
    preset: str
    knobs: dict[str, object]  # preset defaults overlaid with the user's checked values
    backend: str
    base_dir: Path  # on this machine: where local runs write, what docker bind-mounts
    command: command.StageCommand  # as it runs inside the backend
    remote_gpu: str | None  # the Modal GPU string (None: CPU container)
    dry_run: bool
    detach: bool
    given: dict[str, object] = field(default_factory=dict)  # the user's checked knobs
    # Speedrun entries only: how logs name it, run even when complete, start without waiting
    # (the rest of the download), wait for the background run before starting.
    label: str = ""
    force: bool = False
    background: bool = False
    wait: bool = False

    @property
    def done_path(self) -> str | None:
        return self.stage.done_path(self.knobs)


def resolve_base_dir(given: object | None) -> Path:
    raw = given or os.environ.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR
    return Path(str(raw)).expanduser().absolute()


def check_writable(path: Path) -> None:
    """BASE_DIR must be a directory we can write, or creatable inside one."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"BASE_DIR {path} is not writable: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"BASE_DIR {path} is not writable ({probe} denies writing)")


def check_source(stage: Stage, source: str) -> None:
    if stage.source_is_data:
        if not (source.startswith(("http://", "https://")) or Path(source).is_dir()):
            raise UsageError(
                f"SOURCE for {stage.name} must be an http(s) mirror URL or an existing "
                f"folder, got {source!r}"
            )
    elif source not in CHECKPOINT_SOURCES:
        raise UsageError(f"SOURCE must be one of {', '.join(CHECKPOINT_SOURCES)}, got {source!r}")


def check_needs(stage: Stage, knobs: dict[str, object], backend: str, dry_run: bool) -> None:
    """The knobs and secrets a stage cannot run without, and a DEST the backend can see."""
    for name in stage.needs:
        if knobs.get(name) is None:
            knob = KNOBS_BY_NAME[name]
            raise UsageError(f"make {stage.name} needs {knob.make_var}= ({knob.help})")
    if not dry_run:
        have = load_secrets()
        for name in stage.secrets:
            if name not in have:
                raise UsageError(f"make {stage.name} needs {name} in the environment or .env")
    dest = knobs.get("dest")
    if "dest" in stage.knobs and dest is not None and backend != "local":
        if Path(str(dest)).expanduser().is_absolute() or ".." in Path(str(dest)).parts:
            raise UsageError(
                f"DEST={dest} is a path on this machine, which BACKEND={backend} cannot see: "
                "give a name, kept under BASE_DIR/export (e.g. DEST=my-model)"
            )


def process_count(
    stage: Stage, gpus: int | None, visible: int, check: bool, cores: int, where: str
) -> int:
    """Processes for the stage: GPUS, else every GPU there, else 1 (CPU)."""
    if not stage.multiprocess:
        return 1
    nproc = gpus or max(visible, 1)
    if check:
        if visible and nproc > visible:
            raise UsageError(f"GPUS={nproc} but only {visible} GPU(s) {where}")
        if not visible and nproc > cores:
            raise UsageError(
                f"GPUS={nproc} but no GPU {where.replace('are', 'is', 1)} "
                f"and only {cores} CPU cores exist"
            )
    return nproc


def backend_module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def plan(stage_name: str, quiet: bool = False, **raw: object) -> Plan:
    """Validate everything and build the command. ``quiet`` drops the unused-knob notes."""
    stage = get_stage(stage_name)
    given = check_raw(raw)
    backend = str(given.get("backend", "local"))
    preset = get_preset(str(given.get("preset", DEFAULT_PRESET)))
    dry_run = bool(given.get("dry_run"))
    knobs = {**preset.knobs, **given}
    notes = [
        f"{KNOBS_BY_NAME[name].make_var} is not used by stage {stage.name!r}"
        + (" (it is a speedrun knob)" if name in SPEEDRUN_KNOBS else "")
        for name in given
        if name not in stage.knobs and name not in RUNNER_KNOBS
    ]
    for note in [] if quiet else notes + runner_notes(given, backend):
        print(f"note: {note}", file=sys.stderr)
    nodes = node_plan(stage, knobs, backend)
    if "source" in stage.knobs and knobs.get("source") is not None:
        check_source(stage, str(knobs["source"]))
        if stage.source_is_data and backend != "local" and Path(str(knobs["source"])).is_dir():
            raise UsageError(
                f"SOURCE={knobs['source']} is a folder on this machine, which BACKEND={backend} "
                "cannot see: use an http(s) mirror, or BACKEND=local"
            )
    check_needs(stage, knobs, backend, dry_run)
    base_dir = resolve_base_dir(knobs.get("base_dir"))
    gpus = int(knobs["gpus"]) if knobs.get("gpus") else None
    gpu_string = remote_gpu(stage, knobs.get("gpu"))
    if backend == "modal":
        # The remote container decides its own threads and reads its GPU count at run time;
        # here we show what the requested GPUs imply.
        where = f"are in the remote container (GPU={knobs.get('gpu') or gpu_string})"
        cores = remote_resources(stage, gpu_string)[0]
        nproc = process_count(stage, gpus, gpu_count(gpu_string), True, cores, where)
        run_dir = CONTAINER_BASE_DIR
        threads = remote_threads(stage, gpu_string, nproc)
    else:
        check_writable(base_dir)
        visible = local.visible_gpus()
        cores = os.cpu_count() or 1
        nproc = process_count(stage, gpus, visible, not dry_run, cores, "are visible here")
        run_dir = base_dir if backend == "local" else CONTAINER_BASE_DIR
        # One thread per process with GPUs (they do the work); on CPU, share the cores out.
        threads = 1 if visible else max(1, (os.cpu_count() or 1) // nproc)
    if not dry_run and not stage.implemented():
        raise UsageError(f"stage {stage.name!r} is not implemented yet ({stage.module})")
    cmd = command.build(stage, preset.name, knobs, nproc, run_dir, threads, nodes)
    if backend != "local" and not dry_run:
        backend_module(backend).check_ready()
    return Plan(
        stage=stage,
        preset=preset.name,
        knobs=knobs,
        backend=backend,
        base_dir=base_dir,
        command=cmd,
        remote_gpu=gpu_string if backend == "modal" else None,
        dry_run=dry_run,
        detach=bool(given.get("detach")),
        given=given,
    )


def node_plan(stage: Stage, knobs: dict[str, object], backend: str) -> command.Nodes:
    """This node's place in a NODES>1 run, every combination checked (one line each):
    NODES>1 only for a multi-process stage; NODE_RANK and MASTER_ADDR on local and docker
    (every node runs the same command with its own NODE_RANK), never on Modal (its cluster
    says them); NODE_RANK < NODES; the node knobs only with NODES>1."""
    count = int(knobs.get("nodes") or 1)
    rank, addr, port = knobs.get("node_rank"), knobs.get("master_addr"), knobs.get("master_port")
    given = [name for name, value in (("NODE_RANK", rank), ("MASTER_ADDR", addr),
                                      ("MASTER_PORT", port)) if value is not None]  # fmt: skip
    if count == 1:
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise UsageError(
                f"{', '.join(given)} {verb} only to a multi-node run: add NODES=2 or more"
            )
        return command.SINGLE_NODE
    if not stage.multiprocess:
        raise UsageError(
            f"NODES={count}: stage {stage.name!r} runs as one process ({stage.hardware}); "
            "only the multi-GPU stages (hardware gpus in `make help`) run on several nodes"
        )
    port = int(port or command.DEFAULT_MASTER_PORT)
    if backend == "modal":
        if rank is not None or addr is not None:
            raise UsageError(
                "NODE_RANK and MASTER_ADDR are not for BACKEND=modal: its cluster numbers the "
                "nodes and gives node 0's address"
            )
        if count not in CLUSTER_SIZES:
            sizes = " or ".join(map(str, CLUSTER_SIZES))
            raise UsageError(f"NODES={count}: Modal clusters here have {sizes} nodes")
        gpu = remote_gpu(stage, knobs.get("gpu"))
        if gpu_count(gpu) != GPUS_PER_CLUSTER_NODE:
            raise UsageError(
                f"NODES={count} on Modal needs whole 8-GPU nodes (GPU=H100:8 or the like), "
                f"got GPU={knobs.get('gpu') or gpu}"
            )
        return command.Nodes(count, None, "", port)
    if rank is None:
        raise UsageError(
            f"NODES={count} needs NODE_RANK: this machine's index, 0 on the node at MASTER_ADDR, "
            f"1 .. {count - 1} on the others (the same command on every node)"
        )
    if int(rank) >= count:
        raise UsageError(f"NODE_RANK={rank} is not below NODES={count}: use 0 .. {count - 1}")
    if addr is None:
        raise UsageError(
            f"NODES={count} needs MASTER_ADDR: the address of node 0 (NODE_RANK=0) that every "
            "node can reach, e.g. MASTER_ADDR=10.0.0.1"
        )
    return command.Nodes(count, int(rank), str(addr), port)


def runner_notes(given: dict[str, object], backend: str) -> list[str]:
    notes = []
    if given.get("detach") and backend != "modal":
        notes.append("DETACH only applies to BACKEND=modal")
    if "gpu" in given and backend != "modal":
        notes.append("GPU only applies to BACKEND=modal; GPUS sets the process count here")
    return notes


def dry_run_note(the_plan: Plan) -> str:
    env = " ".join(f"{k}={v}" for k, v in the_plan.command.env.items())
    note = f"# dry run: nothing ran; the command gets {env}"
    nodes = the_plan.command.nodes
    if nodes.count > 1:
        note += "\n# " + nodes_line(nodes, the_plan.command.nproc, the_plan.backend)
    if the_plan.stage.implemented():
        args = command.script_args(the_plan.stage, the_plan.preset, the_plan.knobs)
        processes = the_plan.command.nproc * nodes.count
        for line in explain_lines(the_plan.stage, args, processes, the_plan.base_dir):
            note += f"\n# {line}"
    if not the_plan.stage.implemented():
        note += f"\n# note: stage {the_plan.stage.name!r} is not implemented yet"
    return note


def explain_lines(stage: Stage, args: list[str], processes: int, base: Path) -> list[str]:
    """What the stage's ``explain`` says of its script arguments at this process count
    (pretraining: the dial; a line "warning: ..." when the batch does not divide); none
    for a stage without one."""
    if not stage.explain:
        return []
    module, _, function = stage.explain.partition(":")
    return getattr(importlib.import_module(module), function)(args, processes, base)


def nodes_line(nodes: command.Nodes, nproc: int, backend: str) -> str:
    """What a multi-node run is, in one line (dry runs print it)."""
    world = f"{nodes.count} nodes x {nproc} process(es) = {nodes.count * nproc} ranks"
    if backend == "modal":
        return f"{world}; Modal starts the nodes together and numbers them"
    return (
        f"{world}; this is node {nodes.rank}: run the same command on every node with its "
        "own NODE_RANK, all within 10 min (torchrun waits that long); node 0 "
        f"({nodes.master_addr}) must accept TCP port {nodes.master_port} and NCCL's/gloo's "
        "connections from the others, and every node must see the same BASE_DIR "
        "(docs/multinode.md)"
    )


# ---- make speedrun ------------------------------------------------------------------------


def force_start(entries: list[SpeedrunEntry], value: object | None) -> int | None:
    """The index of the first entry FORCE reruns (FORCE=a,b: the earliest of them; every
    later entry is forced too); None without FORCE. Unknown names are a UsageError."""
    if not value:
        return None
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    known = list(dict.fromkeys(entry.stage for entry in stages.SPEEDRUN))
    if not names:
        raise UsageError(f"FORCE names no stage; speedrun stages: {', '.join(known)}, all")
    if "all" in names:
        return 0
    starts = []
    for name in names:
        if name not in known:
            raise UsageError(
                f"FORCE: {name!r} is not a speedrun stage; speedrun stages: {', '.join(known)}, all"
            )
        at = next((i for i, entry in enumerate(entries) if entry.stage == name), None)
        if at is None:
            when = next(entry.when for entry in stages.SPEEDRUN if entry.stage == name)
            raise UsageError(f"FORCE: {name!r} runs in the speedrun only with {when.upper()}=1")
        starts.append(at)
    return min(starts)


def speedrun_plans(**raw: object) -> list[Plan]:
    """Plans for every speedrun entry in order, FORCE and the background download applied.
    Every stage must exist unless this is a dry run."""
    given = check_raw(raw)
    dry_run = bool(given.get("dry_run"))
    entries = [e for e in stages.SPEEDRUN if e.when is None or given.get(e.when)]
    forced_from = force_start(entries, given.get("force"))
    missing = list(dict.fromkeys(e.stage for e in entries if not get_stage(e.stage).implemented()))
    if missing and not dry_run:
        raise UsageError(
            f"speedrun needs stage(s) not implemented yet: {', '.join(missing)} "
            "(DRY_RUN=1 shows the plan)"
        )
    stage_knobs = {k: v for k, v in given.items() if k not in SPEEDRUN_KNOBS}
    if int(given.get("nodes") or 1) > 1 and given.get("backend", "local") != "modal":
        raise UsageError(
            "make speedrun with NODES>1 runs on BACKEND=modal only; on your own machines run "
            "the stages one by one: the one-process stages on one node, each multi-GPU stage "
            "on every node with its NODE_RANK (docs/multinode.md)"
        )
    plans = []
    for index, entry in enumerate(entries):
        # The entry's knobs win (chat-eval's SOURCE); every plan is checked as a dry run
        # first, so nothing starts before all of them are valid. NODES is for the
        # multi-GPU stages; the others run in one container.
        knobs = {**stage_knobs, **entry.knobs, "dry_run": True}
        if not get_stage(entry.stage).multiprocess:
            knobs = {k: v for k, v in knobs.items() if k not in NODE_KNOBS}
        the_plan = plan(entry.stage, quiet=True, **knobs)
        force = forced_from is not None and index >= forced_from
        if force and trains(the_plan.stage):  # its inputs changed: start over
            env = {**the_plan.command.env, RESUME_ENV: "never"}
            the_plan = dataclasses.replace(
                the_plan, command=dataclasses.replace(the_plan.command, env=env)
            )
        plans.append(dataclasses.replace(the_plan, label=entry.label, force=force))
    used = {knob for p in plans for knob in p.stage.knobs} | {*RUNNER_KNOBS, *SPEEDRUN_KNOBS}
    notes = [f"{KNOBS_BY_NAME[k].make_var} is not used by any speedrun stage" for k in given]
    notes = [note for k, note in zip(given, notes, strict=True) if k not in used]
    for note in notes + runner_notes(given, plans[0].backend):
        print(f"note: {note}", file=sys.stderr)
    plans = split_download(plans)
    if not dry_run and plans[0].backend != "local":
        backend_module(plans[0].backend).check_ready()
    return [dataclasses.replace(p, dry_run=dry_run) for p in plans]


def split_download(plans: list[Plan]) -> list[Plan]:
    """Where it helps, the download entry becomes two: the first TOKENIZER_SHARDS shards
    now, then the whole download in the background while the WHILE_DOWNLOADING entries
    (the tokenizer's) run; the entry after them waits for it. It helps when more shards are
    wanted than the tokenizer reads and a tokenizer entry will run (on Modal, where the
    volume cannot be seen from here, it is assumed to)."""
    at = next((i for i, p in enumerate(plans) if p.stage.name == "download"), None)
    if at is None:
        return plans
    full = plans[at]
    shards = int(full.knobs.get("shards") or 0)
    source = str(full.knobs.get("source") or "")
    converts = bool(source) and not source.startswith(("http://", "https://"))  # a folder
    if shards <= TOKENIZER_SHARDS or full.knobs.get("dataset") == "embedded" or converts:
        return plans
    end = at + 1
    while end < len(plans) and plans[end].stage.name in stages.WHILE_DOWNLOADING:
        end += 1
    during = plans[at + 1 : end]
    helps = any(
        p.done_path and (p.force or p.backend == "modal" or not is_complete(p)) for p in during
    )
    if end == len(plans) or not helps:
        return plans
    first = plan(
        "download", quiet=True, **{**full.given, "shards": TOKENIZER_SHARDS, "dry_run": True}
    )
    return [
        *plans[:at],
        dataclasses.replace(first, label=f"download SHARDS={TOKENIZER_SHARDS}", force=full.force),
        dataclasses.replace(full, label=f"download SHARDS={shards}", background=True),
        *during,
        dataclasses.replace(plans[end], wait=True),
        *plans[end + 1 :],
    ]


def speedrun_notes(plans: list[Plan]) -> list[str]:
    """What FORCE and the background download do to this speedrun, in words."""
    lines = []
    forced = [p.label for p in plans if p.force and not p.background]
    if forced:
        fresh = [p.label for p in plans if p.command.env.get(RESUME_ENV) == "never"]
        line = f"FORCE: {', '.join(forced)} run again even if complete"
        if fresh:
            line += f"; {', '.join(fresh)} start over ({RESUME_ENV}=never; nothing is deleted)"
        lines.append(line)
    background = next((i for i, p in enumerate(plans) if p.background), None)
    if background is not None:
        rest = int(plans[background].knobs["shards"]) - TOKENIZER_SHARDS
        during = [
            p.label for p in plans[background + 1 :] if p.stage.name in stages.WHILE_DOWNLOADING
        ]
        waiter = next(p.label for p in plans if p.wait)
        lines.append(
            f"download: first {TOKENIZER_SHARDS} shards now, the other {rest} in the background "
            f"while {', '.join(during)} run; {waiter} waits for it"
        )
    return lines


def entry_line(number: int, the_plan: Plan) -> str:
    """One entry of a speedrun as a dry run lists it: ``[8] chat-eval SOURCE=mid (forced)``."""
    states = []
    if the_plan.background:
        states.append("in the background")
    if the_plan.wait:
        states.append("after the background download")
    if the_plan.force:
        fresh = the_plan.command.env.get(RESUME_ENV) == "never"
        states.append(f"forced{f', {RESUME_ENV}=never' if fresh else ''}")
    elif the_plan.backend == "modal":
        states.append("skipped when complete" if the_plan.done_path else "always runs")
    elif is_complete(the_plan):
        states.append(f"complete ({the_plan.done_path}): skipped")
    return f"[{number}] {the_plan.label or the_plan.stage.name}" + (
        f" ({'; '.join(states)})" if states else ""
    )


def is_complete(the_plan: Plan) -> bool:
    """Whether the stage's completion marker is in the plan's BASE_DIR."""
    marker = the_plan.done_path
    return marker is not None and (the_plan.base_dir / marker).exists()
