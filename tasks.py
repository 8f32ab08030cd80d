"""Invoke tasks: one per stage of backends/stages.py, speedrun, and the helpers around them.

    invoke --list
    invoke pretrain --depth 12 --gpus 8 --dry-run      # == make pretrain DEPTH=12 GPUS=8 DRY_RUN=1
    invoke speedrun --backend modal --detach           # == make speedrun BACKEND=modal DETACH=1

Every stage task (and speedrun) takes the same knob flags (backends/knobs.py) and hands them
to ``backends.launch``; this file only chooses, it never builds commands itself. The docker
and Modal helpers import their backend module only when called.
"""

from __future__ import annotations

import inspect
import shlex
import sys
from collections.abc import Callable

from invoke import Collection, Exit, Task

from backends.knobs import KNOBS
from backends.launch import launch, speedrun
from backends.planning import resolve_base_dir
from backends.stages import STAGES
from nanochat import lifeline
from nanochat.common import UsageError


def _exit_with(run: Callable[[], int]) -> None:
    """Run, turning a UsageError into one line + exit 2 and a failure into its exit code.
    This launcher ends with whatever started it (make's shell, killed with make): SIGTERM,
    which it forwards to the stage, so no stage runs on unwatched."""
    lifeline.die_with_parent()
    try:
        code = run()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise Exit(code=2) from None
    if code:
        raise Exit(code=code)


def _knob_task(name: str, summary: str, action: Callable[..., int]) -> Task:
    def body(c, **knobs):
        _exit_with(lambda: action(**knobs))

    # The flags come from the knob table: a knob added there appears on every task.
    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(
            k.name, inspect.Parameter.KEYWORD_ONLY, default=False if k.kind == "bool" else None
        )
        for k in KNOBS
    ]
    body.__signature__ = inspect.Signature(params)
    body.__name__ = name.replace("-", "_")
    body.__doc__ = summary
    return Task(body, name=name, help={k.name: k.help for k in KNOBS})


CLUSTER_FILE_FLAGS = {  # name: (default, help)
    "stage": ("pretrain", "the multi-GPU stage to run (default pretrain)"),
    "out": (None, "the file to write (default nanochat-<stage>-<N>nodes.<suffix>)"),
    "image": (None, "SkyPilot: the image every node runs (default the local docker-build tag)"),
    "bucket": (None, "SkyPilot: the bucket mounted as BASE_DIR (default: asked for at launch)"),
}


def _cluster_file_task(kind: str, summary: str) -> Task:
    """``skypilot-task`` / ``slurm-script``: the knob flags plus those of CLUSTER_FILE_FLAGS."""
    from backends import cluster_files

    def action(**given):
        extra = {
            name: given.pop(name, default) for name, (default, _) in CLUSTER_FILE_FLAGS.items()
        }
        return cluster_files.write(
            kind, extra["stage"], extra["out"], extra["image"], extra["bucket"], **given
        )

    task = _knob_task(f"{kind}-{'task' if kind == 'skypilot' else 'script'}", summary, action)
    params = list(task.body.__signature__.parameters.values())
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, (default, _) in CLUSTER_FILE_FLAGS.items()
    ]
    task.body.__signature__ = inspect.Signature(params)
    task.help.update({name: text for name, (_, text) in CLUSTER_FILE_FLAGS.items()})
    return task


def _stage_task(stage_name: str, summary: str) -> Task:
    return _knob_task(stage_name, summary, lambda **knobs: launch(stage_name, **knobs))


def _run(c, argv: list[str], env: dict | None = None) -> None:
    result = c.run(shlex.join(argv), warn=True, pty=False, env=env or {})
    if result.exited:
        raise Exit(code=result.exited)


def test(c, args=""):
    """lint, then the test suite (CPU, offline) on every core (pytest-xdist); ARGS go to
    pytest, and a run with ARGS (a few tests while you work) skips the lint"""
    if not args.strip():
        lint(c)
    parallel = ["-n", "auto", "--dist", "loadscope"]  # a module's tests stay on one worker
    _run(c, [sys.executable, "-m", "pytest", *parallel, "--durations=10", *shlex.split(args)])


def lint(c):
    """ruff check + format check (make test runs it first; CI enforces it)"""
    print("[nanochat] lint: ruff check + ruff format --check", flush=True)
    _run(c, [sys.executable, "-m", "ruff", "check", "."])
    _run(c, [sys.executable, "-m", "ruff", "format", "--check", "."])


def _tool(c, module: str, args: str, base_dir, dry_run: bool) -> None:
    """Run a bench tool against BASE_DIR (the knob, else $NANOCHAT_BASE_DIR, else the
    default), or with DRY_RUN print the exact command and stop."""
    argv = [sys.executable, "-m", module, *shlex.split(args)]
    base = resolve_base_dir(base_dir)
    if dry_run:
        print(shlex.join(argv))
        print(f"# dry run: nothing ran; the command gets NANOCHAT_BASE_DIR={base}")
        return
    _run(c, argv, env={"NANOCHAT_BASE_DIR": str(base)})


TOOL_HELP = {"base_dir": "artifacts root (BASE_DIR)", "dry_run": "print the command, run nothing"}


def bench(c, args="", base_dir=None, dry_run=False):
    """benchmark a training step (tokens/s, MFU); --record appends to docs/benchmarks.md"""
    _tool(c, "scripts.bench_train", args, base_dir, dry_run)


def ablate(c, args="", base_dir=None, dry_run=False):
    """ablate the recipe on the CPU (each feature on/off, 3 seeds; resumable, hours)"""
    _tool(c, "scripts.ablate", args, base_dir, dry_run)


def bench_engine(c, args="", base_dir=None, dry_run=False):
    """benchmark inference: first token, decode tokens/s at batch 1 and 8 (greedy, warmed up)"""
    _tool(c, "scripts.bench_engine", args, base_dir, dry_run)


def lock(c):
    """re-resolve uv.lock after a dependency change in pyproject.toml (needs PyPI)"""
    _run(c, [sys.executable, "-m", "uv", "lock"])


def docker_build(c):
    """build the image (docker CLI, BuildKit), tagged by a hash of its inputs"""
    from backends import docker_backend

    _exit_with(docker_backend.build)


def docker_shell(c, base_dir=None):
    """an interactive shell in the image: GPUs, BASE_DIR mounted at /data/nanochat"""
    from backends import docker_backend

    _exit_with(lambda: docker_backend.shell(resolve_base_dir(base_dir)))


def volume_ls(c, path=""):
    """list the Modal volumes (PATH: a folder under BASE_DIR, e.g. base_checkpoints)"""
    from backends import modal_backend

    _exit_with(lambda: modal_backend.volume_ls(path))


def volume_get(c, path="", dest="."):
    """download PATH (relative to BASE_DIR) from the Modal volumes into DEST"""
    from backends import modal_backend

    _exit_with(lambda: modal_backend.volume_get(path, dest))


ns = Collection()
for _stage in STAGES:
    ns.add_task(_stage_task(_stage.name, _stage.summary))
ns.add_task(
    _knob_task(
        "speedrun",
        "every stage in order, skipping complete ones (RL=1 adds RL, FORCE=stage reruns)",
        speedrun,
    )
)
ns.add_task(
    _cluster_file_task("skypilot", "write a SkyPilot task that runs a stage on NODES nodes")
)
ns.add_task(_cluster_file_task("slurm", "write an sbatch script that runs a stage on NODES nodes"))
ns.add_task(Task(test, help={"args": "extra pytest arguments"}))
ns.add_task(Task(lint))
ns.add_task(Task(lock))
ns.add_task(
    Task(
        bench_engine,
        name="bench-engine",
        help={"args": "e.g. '--source base --record'", **TOOL_HELP},
    )
)
ns.add_task(
    Task(ablate, help={"args": "flags for scripts.ablate, e.g. '--depths 4 --table'", **TOOL_HELP})
)
ns.add_task(
    Task(bench, help={"args": "flags for scripts.bench_train, e.g. '--depth=20'", **TOOL_HELP})
)
ns.add_task(Task(docker_build, name="docker-build"))
ns.add_task(Task(docker_shell, name="docker-shell", help={"base_dir": "artifacts root to mount"}))
ns.add_task(Task(volume_ls, name="volume-ls", help={"path": "folder under BASE_DIR"}))
ns.add_task(
    Task(
        volume_get,
        name="volume-get",
        help={"path": "file or folder under BASE_DIR", "dest": "local destination (default .)"},
    )
)
