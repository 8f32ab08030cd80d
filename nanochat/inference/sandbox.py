"""The operating-system fence around model-written code: which layer runs it, how it is
started (bubblewrap's command line) and how everything it started is stopped.

``nanochat.inference.execution.execute_code`` (HumanEval answers, scored by
``scripts/chat_eval.py``) runs every program under one of two layers, chosen once per process:

- ``bwrap``: Debian's bubblewrap. New pid, network, ipc and uts namespaces (and a new user
  namespace when the caller is not root), a root file system that holds only the read-only
  system (/usr, the /lib and /bin links, two files of /etc) and the Python interpreter with
  its virtual environment, read-only; a fresh /proc that shows only the sandbox, /dev
  read-only, a private size-limited /tmp/work as the only writable place, no network,
  ``--die-with-parent`` and ``--new-session``, and an environment of only the few variables
  the child needs. Run as root, bubblewrap starts the program as root inside those
  namespaces with only CAP_SETUID and CAP_SETGID, and the runner switches to uid/gid 65534
  (nobody) before the program runs: a real unprivileged uid outside the namespaces too,
  which a user namespace mapped onto root would not be. The pid namespace dies with its
  init, so nothing the program starts outlives the run.
- ``guard``: no OS isolation, only the in-process guard of ``nanochat.inference.execution`` (it also
  runs inside bubblewrap, as the second layer). Run as root, the child still switches to
  uid/gid 65534 before the program runs, so it can neither read the parent's
  /proc/<pid>/environ nor write root's files; it can read world-readable files, write
  world-writable folders (/tmp) and use the network.

``NANOCHAT_SANDBOX`` chooses: ``auto`` (default: bubblewrap when it works here, else the
guard, and the one-line description says why), ``bwrap`` (bubblewrap or a one-line
UsageError, never a silent downgrade) or ``guard``. Whether a layer works is probed by
running one tiny program through it (bubblewrap can be missing, or refused inside containers
such as gVisor or Docker without privileges); ``nanochat.inference.execution.sandbox_description()``
probes and returns the line chat_eval logs at startup.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nanochat.common import StageFailed, UsageError

SANDBOX_ENV = "NANOCHAT_SANDBOX"
CHOICES = ("auto", "bwrap", "guard")
NOBODY = 65534  # uid and gid of "nobody" on Debian and most Linux systems
TMP_BYTES = 64 << 20  # size of the private /tmp/work under bubblewrap (its only disk)
PROGRAM_INSIDE = "/program.py"  # where bubblewrap mounts the program file, read-only
# The program's cwd, HOME and TMPDIR under bubblewrap, its only writable place: not /tmp
# itself, so that the guard inside refuses the same paths as the guard-only layer (a score
# must not depend on the layer).
WORK_INSIDE = "/tmp/work"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")  # the loader's cache, the time zone
KILL_GRACE_S = 10.0  # after SIGKILL to the sandbox's init: the kernel empties the namespace


class SandboxError(StageFailed):
    """The sandbox itself failed (not the program in it): the run proves nothing."""

    def __init__(self, layer: str, why: str):
        super().__init__(f"sandbox: the {layer} layer did not start the program: {why}")
        self.why = why


@dataclass(frozen=True)
class Layer:
    """The fence in use. ``drop_uid``: the runner switches to uid/gid 65534 before the
    program runs (the caller is root); ``remap_imports``: it first opens the interpreter's
    import folders so that uid 65534 can still import from them when they lie somewhere it
    cannot walk to (a Python under /root); ``why``: why this layer and not a stronger one."""

    name: str
    drop_uid: bool
    bwrap: str | None = None
    why: str = ""

    @property
    def remap_imports(self) -> bool:
        return self.drop_uid and self.name == "guard"

    def description(self) -> str:
        """One line for the startup log: what fences model code in, and what it can still do."""
        if self.name == "bwrap":
            spaces = "pid/net/ipc/uts" if self.drop_uid else "user/pid/net/ipc/uts"
            who = ", uid 65534" if self.drop_uid else ""
            return (
                f"sandbox: bubblewrap (new {spaces} namespaces, read-only system, private "
                f"/tmp/work, no network{who}) + in-process guard"
            )
        if self.drop_uid:
            return (
                f"sandbox: in-process guard + uid 65534 ({self.why}): model code can read "
                "world-readable files, write world-writable folders and use the network"
            )
        return (
            f"sandbox: in-process guard only ({self.why}): model code can read files you can "
            "read, write where you can and use the network"
        )


def requested() -> str:
    """The layer ``NANOCHAT_SANDBOX`` asks for; UsageError (one line) for an unknown value."""
    value = os.environ.get(SANDBOX_ENV, "").strip() or "auto"
    if value not in CHOICES:
        raise UsageError(f"{SANDBOX_ENV}={value!r}: choose one of {', '.join(CHOICES)}")
    return value


def find_bwrap() -> str | None:
    """bubblewrap's path: on PATH, else where Debian installs it."""
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")


def _is_root() -> bool:
    return os.geteuid() == 0


_lock = threading.Lock()
_chosen: dict[str, Layer] = {}  # requested value -> layer, probed once per process


def select_layer(probe: Callable[[Layer], str | None]) -> Layer:
    """The layer for this process's ``NANOCHAT_SANDBOX``, probed once: ``probe(layer)``
    runs a tiny program through ``layer`` and returns None when it worked, else one line
    saying what failed. UsageError when bwrap is asked for and does not work here;
    SandboxError when not even the guard layer can run a program."""
    choice = requested()
    with _lock:
        if choice in _chosen:
            return _chosen[choice]
        root = _is_root()
        why = f"{SANDBOX_ENV}=guard"
        if choice in ("auto", "bwrap"):
            bwrap = find_bwrap()
            failure = "bwrap not found" if bwrap is None else None
            if bwrap is not None:
                layer = Layer("bwrap", drop_uid=root, bwrap=bwrap)
                failure = probe(layer)
                if failure is None:
                    _chosen[choice] = layer
                    return layer
                failure = f"bwrap does not work here: {failure}"
            if choice == "bwrap":
                raise UsageError(f"{SANDBOX_ENV}=bwrap but {failure}")
            why = failure
        layer = Layer("guard", drop_uid=root, why=why)
        failure = probe(layer)
        if failure is not None and root:
            # No switch to uid 65534 possible here (a container without CAP_SETUID): say so
            # in the description rather than fail every program.
            layer = Layer("guard", drop_uid=False, why=f"{why}; no uid drop: {failure}")
            failure = probe(layer)
        if failure is not None:
            raise SandboxError("guard", failure)
        _chosen[choice] = layer
        return layer


def _interpreter_roots() -> list[str]:
    """The folders the interpreter needs besides the system: its prefixes (the virtual
    environment and the Python it was made from), outermost first, none inside another or
    inside a system folder. Deliberately not other sys.path entries: a .pth file may add a
    project folder, and a project folder may hold a .env."""
    candidates = {
        os.path.realpath(p)
        for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
    }
    candidates.add(os.path.dirname(os.path.realpath(sys.executable)))
    candidates |= {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix)}  # unresolved too
    roots: list[str] = []
    for path in sorted(candidates, key=len):
        inside = [*SYSTEM_DIRS, *roots]
        if any(path == r or path.startswith(r + os.sep) for r in inside):
            continue
        if os.path.isdir(path):
            roots.append(path)
    return roots


def bwrap_argv(
    layer: Layer, program: str, info_fd: int, env: dict[str, str], command: list[str]
) -> list[str]:
    """The bubblewrap command line that runs ``command`` on the host file ``program``
    (mounted read-only at PROGRAM_INSIDE), writing the sandbox's init pid to ``info_fd``."""
    assert layer.bwrap is not None
    args = [layer.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if layer.drop_uid:
        # As root no user namespace is needed: the runner drops to a real uid 65534 instead,
        # and needs only these two capabilities until then.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns"]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    made = {"/"}

    def folders_to(path: str) -> list[str]:
        # Folders bubblewrap makes on the way are 0700 when it runs as root: uid 65534 must
        # be able to walk through them.
        parts = path.strip("/").split("/")
        made_now = []
        for depth in range(1, len(parts)):
            folder = "/" + "/".join(parts[:depth])
            if folder not in made:
                made_now += ["--perms", "0755", "--dir", folder]
                made.add(folder)
        return made_now

    for path in SYSTEM_FILES:  # /etc itself made 0755 first: uid 65534 reads these files
        args += [*folders_to(path), "--ro-bind-try", path, path]

    for root in _interpreter_roots():
        args += [*folders_to(root), "--ro-bind", root, root]
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    args += [*folders_to(WORK_INSIDE), "--size", str(TMP_BYTES), "--perms", "01777"]
    args += ["--tmpfs", WORK_INSIDE, "--chdir", WORK_INSIDE]
    args += [*folders_to(PROGRAM_INSIDE), "--ro-bind", program, PROGRAM_INSIDE]
    # Last, the root itself read-only: in a user namespace its folders belong to the
    # program's uid, and writes there would fill memory past TMP_BYTES.
    args += ["--remount-ro", "/"]
    args += ["--info-fd", str(info_fd), "--clearenv"]
    for name, value in env.items():
        args += ["--setenv", name, value]
    return [*args, "--", *command]


def sandbox_init(info_fd: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's init, from bubblewrap's ``--info-fd`` JSON; None when
    bubblewrap failed before starting it. A pidfd, not the pid, so that the kill can never
    hit a stranger that reused the number."""
    data = b""
    poller = select.poll()  # not select(): a process with torch loaded may hold fds > 1023
    poller.register(info_fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(math.ceil(left * 1000)):
            return None
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        pid = int(json.loads(data)["child-pid"])
        return os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError):
        # Gone already (its namespace then is empty), or a kernel without pidfds (before
        # 5.3): there the init dies with bubblewrap, a moment after the call returns.
        return None


def stop(proc: subprocess.Popen, init: int | None) -> None:
    """Kill what is left of the run and reap it, also after a normal end: bubblewrap
    returns as soon as the program exits, while its init would wait for any process the
    program left behind. Killing the init makes the kernel kill every process of its pid
    namespace, and its pidfd turns readable only after that, so when this returns nothing
    of the run is alive."""
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already
        poller = select.poll()
        poller.register(init, select.POLLIN)
        poller.poll(int(KILL_GRACE_S * 1000))
        os.close(init)
    _kill_group(proc.pid)  # the guard layer's process group; bubblewrap's, if it hung
    proc.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
