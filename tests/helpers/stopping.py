"""A trainer stopped by SIGTERM mid-run, as a preemption stops it: start the stage as a real
process, wait for its second step line, send SIGTERM, and check the loop's promise (exit 143,
a checkpoint of the step it stopped at, the line saying so). Used by the pretraining and
chat-stage tests (the one loop, nanochat/training/train_loop.py, serves both)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import REPO, cli_env

from nanochat.training import checkpoint


def sigterm_after_step_two(argv: list[str], ckpt_dir: Path):
    """Run ``argv``, SIGTERM it after step 2; (the checkpoint it left, its stderr)."""
    env = cli_env({"OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("step 00002/"):
            break
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    found = checkpoint.latest(ckpt_dir)
    assert found is not None and found.step >= 2, err[-2000:]
    assert f"stopped at step {found.step} by signal 15" in err
    return found, err
