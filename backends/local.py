"""The local backend: run a stage's command on this machine.

Output is inherited, so progress bars and logs stream as they are, and the child's exit code
is returned (128+N when signal N ended it). Signals, two cases:

- not at a terminal (CI, docker, Modal, nohup): the child gets its own process group, and
  SIGINT/SIGTERM sent to us are forwarded to that whole group (torchrun and its workers);
- at a terminal: the child stays in our foreground process group, so Ctrl-C reaches it and
  its workers directly, exactly once, and it keeps the terminal as its own (job control,
  reading the keyboard in chat-cli); we wait for it to finish cleanly, and forward a
  SIGTERM sent to us alone.

A third signal kills the child outright: it had two chances to exit cleanly.

The child also dies with us: if this launcher is killed outright (``kill -9`` of make's
group, a closed ssh session), the kernel sends the stage SIGTERM (``nanochat.lifeline``),
so no orphaned trainer keeps writing the checkpoints a rerun is about to use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from backends.command import StageCommand
from backends.secrets import load_secrets
from nanochat import gpus, lifeline

REPO_ROOT = Path(__file__).resolve().parents[1]


def visible_gpus() -> int:
    """How many NVIDIA GPUs this process may use, without importing torch
    (``nanochat.gpus``: nvidia-smi, narrowed by CUDA_VISIBLE_DEVICES)."""
    return gpus.visible_gpus()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment plus ours, with this interpreter's bin/ first on PATH so
    ``python`` and ``torchrun`` in the command are the ones of the project's venv."""
    env = dict(os.environ)
    env.update(extra)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def tied_to_us():
    """A ``preexec_fn`` for Popen: the child gets SIGTERM when this process dies."""
    return lifeline.parent_death_signal(signal.SIGTERM)


def run(command: StageCommand) -> int:
    """Run the command to completion, forwarding signals as above; return its exit code."""
    interactive = sys.stdin is not None and sys.stdin.isatty()
    proc = subprocess.Popen(
        command.argv,
        env=child_env(command.env),
        cwd=REPO_ROOT,
        start_new_session=not interactive,
        preexec_fn=tied_to_us(),
    )
    received = []

    def forward(signum, _frame):
        received.append(signum)
        if len(received) >= 3:
            sig = signal.SIGKILL
        elif interactive and signum == signal.SIGINT:
            return  # the terminal sent Ctrl-C to the child's group (ours) already
        else:
            sig = signum
        try:
            (os.kill if interactive else os.killpg)(proc.pid, sig)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def describe(plan) -> str:
    """What a dry run prints: the command itself (it runs as is here)."""
    return plan.command.shell()


def execute(plan) -> int:
    """Run a planned stage here; secrets from .env fill in what the environment lacks."""
    print(f"[nanochat] {plan.stage.name}: {plan.command.shell()}", file=sys.stderr, flush=True)
    cmd = plan.command
    env = {**load_secrets(), **cmd.env}
    return run(StageCommand(stage=cmd.stage, argv=cmd.argv, env=env, nproc=cmd.nproc))
