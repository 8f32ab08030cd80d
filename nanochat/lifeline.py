"""A stage dies with its launcher: the Linux parent-death signal, set where a stage starts.

The local backend starts a stage in a session of its own (so Ctrl-C and SIGTERM can be
forwarded to its whole group), which also means that killing the launcher's group
(``kill -9 -<pgid>`` of ``make``) used to leave the trainer running, writing checkpoints
that a rerun would fight over. Two links close that gap:

- the launcher (``backends.local``) asks the kernel to send the stage SIGTERM when the
  launcher dies (``prctl(PR_SET_PDEATHSIG)`` in the child between fork and exec; the
  setting survives exec);
- every torchrun worker does the same towards torchrun at start (``runtime.start``), so a
  torchrun killed outright takes its workers with it.

SIGTERM, not SIGKILL: a trainer saves a checkpoint at the end of its step and exits 143,
so nothing is lost. Standard library only; a no-op where prctl does not exist (macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def libc_prctl():
    """libc's prctl, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def parent_death_signal(sig: int = signal.SIGTERM):
    """A call that has the kernel send ``sig`` to the calling process when its parent exits
    (0 when set), or None off Linux. The libc lookup happens here, so the call is safe as a
    ``preexec_fn`` between fork and exec (the launcher's children)."""
    prctl = libc_prctl()
    if prctl is None:
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits. True when set."""
    set_it = parent_death_signal(sig)
    return set_it is not None and set_it() == 0


def die_with_launcher(sig: int = signal.SIGTERM) -> None:
    """``die_with_parent``, and exit at once when the parent died while we were setting it.
    (A parent that died before this process read its pid goes unnoticed: pid 1 is a
    legitimate parent inside containers, so it cannot mean "orphaned".)"""
    parent = os.getppid()
    if die_with_parent(sig) and os.getppid() != parent:
        print("error: the launcher of this stage is gone; not starting", file=sys.stderr)
        raise SystemExit(128 + int(sig))
