"""Invoke tasks: one per stage of backends/stages.py, plus test and lint.

    invoke --list
    invoke pretrain --depth 12 --gpus 8 --dry-run      # == make pretrain DEPTH=12 GPUS=8 DRY_RUN=1

Every stage task takes the same knob flags (backends/knobs.py) and hands them to
``backends.launch``; this file only chooses, it never builds commands itself.
"""

from __future__ import annotations

import inspect
import shlex
import sys

from invoke import Collection, Exit, Task

from backends.knobs import KNOBS
from backends.launch import launch
from backends.stages import STAGES
from nanochat.common import UsageError


def _stage_task(stage_name: str, summary: str) -> Task:
    def body(c, **knobs):
        try:
            code = launch(stage_name, **knobs)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise Exit(code=2) from None
        if code:
            raise Exit(code=code)

    # The flags come from the knob table: a knob added there appears on every task.
    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(
            k.name, inspect.Parameter.KEYWORD_ONLY, default=False if k.kind == "bool" else None
        )
        for k in KNOBS
    ]
    body.__signature__ = inspect.Signature(params)
    body.__name__ = stage_name.replace("-", "_")
    body.__doc__ = summary
    return Task(body, name=stage_name, help={k.name: k.help for k in KNOBS})


def _run(c, argv: list[str]) -> None:
    result = c.run(shlex.join(argv), warn=True, pty=False)
    if result.exited:
        raise Exit(code=result.exited)


def test(c, args=""):
    """run the test suite (CPU, offline); ARGS go to pytest"""
    _run(c, [sys.executable, "-m", "pytest", "--durations=10", *shlex.split(args)])


def lint(c):
    """ruff check + format check"""
    _run(c, [sys.executable, "-m", "ruff", "check", "."])
    _run(c, [sys.executable, "-m", "ruff", "format", "--check", "."])


ns = Collection()
for _stage in STAGES:
    ns.add_task(_stage_task(_stage.name, _stage.summary))
ns.add_task(Task(test, help={"args": "extra pytest arguments"}))
ns.add_task(Task(lint))
