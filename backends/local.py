"""The local backend: run a stage's command on this machine.

The child gets its own process group; Ctrl-C and SIGTERM are forwarded to that whole group
(torchrun and its workers included), and the child's exit code is returned (128+N when a
signal N ended it). Output is inherited, so progress bars and logs stream as they are.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from backends.command import StageCommand

REPO_ROOT = Path(__file__).resolve().parents[1]


def visible_gpus() -> int:
    """How many NVIDIA GPUs this process may use, without importing torch.

    CUDA_VISIBLE_DEVICES narrows what nvidia-smi lists; no nvidia-smi means no GPU.
    """
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        ids = [d for d in mask.split(",") if d.strip()]
        if not ids or ids[0].strip() == "-1":
            return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return min(count, len(ids)) if mask is not None else count


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment plus ours, with this interpreter's bin/ first on PATH so
    ``python`` and ``torchrun`` in the command are the ones of the project's venv."""
    env = dict(os.environ)
    env.update(extra)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def run(command: StageCommand) -> int:
    """Run the command to completion, forwarding SIGINT/SIGTERM; return its exit code."""
    proc = subprocess.Popen(
        command.argv, env=child_env(command.env), cwd=REPO_ROOT, start_new_session=True
    )
    received = []

    def forward(signum, _frame):
        received.append(signum)
        # A third interrupt means "stop now": the child had two chances to exit cleanly.
        sig = signal.SIGKILL if len(received) >= 3 else signum
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code
