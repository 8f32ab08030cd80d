"""The pretraining stage as the tests drive it: ``python -m scripts.base_train`` as a real
process on the toy corpus of the ``toy`` fixture (SMALL is its shape), and the run lock
that says which process holds a tag."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import run_cli

from nanochat.training import checkpoint, run_lock

SMALL = ["--depth=2", "--seq-len=64", "--device-batch=4", "--total-batch=512", "--dataset=toy"]


def train(args: list[str], env: dict | None = None, timeout: float = 300):
    """Run the pretraining stage with ``args`` (one thread), wait, return the result."""
    return run_cli(
        [sys.executable, "-m", "scripts.base_train", *args],
        env={"OMP_NUM_THREADS": "1", **(env or {})},
        timeout=timeout,
    )


def lock_of(base: Path, tag: str = "d2") -> Path:
    """The run lock of the base checkpoints of ``tag``."""
    return run_lock.lock_path(checkpoint.checkpoint_dir(base, "base", tag))


def holder_pid(base: Path, tag: str = "d2") -> int | None:
    """The pid the run lock of ``tag`` names, or None while there is no (readable) lock."""
    try:
        return json.loads(lock_of(base, tag).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
