"""Run one stage: check every input, resolve knobs against the preset, pick the backend.

All checks happen before anything runs or is written; each failure is a ``UsageError``
that the front ends (tasks.py, make) print as one line and turn into exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from backends import command, local
from backends.knobs import CHECKPOINT_SOURCES, KNOBS_BY_NAME, check_raw
from backends.presets import DEFAULT_PRESET, get_preset
from backends.stages import Stage, get_stage
from nanochat.common import BASE_DIR_ENV, DEFAULT_BASE_DIR, UsageError

# Knobs that shape how a stage runs rather than becoming one of its flags.
RUNNER_KNOBS = ("backend", "preset", "gpus", "gpu", "base_dir", "args", "dry_run")


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


def process_count(stage: Stage, gpus: int | None, visible: int, check: bool) -> int:
    """Processes for the stage: GPUS, else every visible GPU, else 1 (CPU)."""
    if not stage.multiprocess:
        return 1
    nproc = gpus or max(visible, 1)
    if check:
        if visible and nproc > visible:
            raise UsageError(f"GPUS={nproc} but only {visible} GPU(s) are visible here")
        if not visible and nproc > (os.cpu_count() or 1):
            raise UsageError(
                f"GPUS={nproc} but no GPU is visible and only {os.cpu_count()} CPU cores exist"
            )
    return nproc


def plan(stage_name: str, **raw: object) -> tuple[command.StageCommand, bool]:
    """Validate everything and build the command. Returns (command, dry_run)."""
    stage = get_stage(stage_name)
    given = check_raw(raw)
    backend = given.get("backend", "local")
    preset = get_preset(str(given.get("preset", DEFAULT_PRESET)))
    if backend != "local":
        raise UsageError(
            f"backend {backend!r} is coming in the next issue; use BACKEND=local for now"
        )
    dry_run = bool(given.get("dry_run"))
    knobs = {**preset.knobs, **given}
    for name in given:
        if name not in stage.knobs and name not in RUNNER_KNOBS:
            print(
                f"note: {KNOBS_BY_NAME[name].make_var} is not used by stage {stage.name!r}",
                file=sys.stderr,
            )
    if "source" in stage.knobs and knobs.get("source") is not None:
        check_source(stage, str(knobs["source"]))
    base_dir = resolve_base_dir(knobs.get("base_dir"))
    check_writable(base_dir)
    visible = local.visible_gpus()
    gpus = int(knobs["gpus"]) if knobs.get("gpus") else None
    nproc = process_count(stage, gpus, visible, check=not dry_run)
    if not dry_run and not stage.implemented():
        raise UsageError(f"stage {stage.name!r} is not implemented yet ({stage.module})")
    # One thread per process with GPUs (they do the work); on CPU, share the cores out.
    threads = 1 if visible else max(1, (os.cpu_count() or 1) // nproc)
    cmd = command.build(stage, preset.name, knobs, nproc, base_dir, omp_threads=threads)
    return cmd, dry_run


def launch(stage_name: str, **raw: object) -> int:
    """Plan, then print (dry run) or run the stage. Returns the exit code."""
    cmd, dry_run = plan(stage_name, **raw)
    if dry_run:
        print(cmd.shell(), flush=True)
        env = " ".join(f"{k}={v}" for k, v in cmd.env.items())
        print(f"# dry run: nothing ran; the command gets {env}", file=sys.stderr)
        if not cmd.stage.implemented():
            print(f"# note: stage {cmd.stage.name!r} is not implemented yet", file=sys.stderr)
        return 0
    print(f"[nanochat] {cmd.stage.name}: {cmd.shell()}", file=sys.stderr, flush=True)
    return local.run(cmd)
