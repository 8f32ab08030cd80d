"""Run untrusted Python (a model's HumanEval answer) in a separate, fenced-in process.

HumanEval (``nanochat.inference.answer_check``) runs the model's answer here with ``execute_code``
and the task's tests in a separate checker process that calls it: only right values pass, since a
program that wants to cheat can fake what ``success`` means here (see below). As upstream: separate
process, temp working dir, scrubbed env, stdin closed, time and memory limits, destructive calls
disabled. Two layers fence the child in:

1. The operating system (``nanochat.inference.sandbox``): bubblewrap where it works here (new
   namespaces, read-only system, a private /tmp/work, no network, the process tree killed
   as a whole), else nothing at this level; as root the child runs as uid 65534 under both.
   ``sandbox_description()`` says in one line which layer is active; chat_eval logs it.
2. The in-process guard, under both: Python-level patches made before the program runs.

What the child gets:

- a fresh interpreter (``python -I -B``: no PYTHON* variables, no user site, no .pyc writes)
  in a new session, cwd = an empty private directory;
- an environment of only ``PATH=/usr/bin:/bin``, ``HOME`` and ``TMPDIR`` (that directory),
  ``LANG``/``LC_ALL`` (C.UTF-8) and ``OMP_NUM_THREADS=1``: no tokens, keys or proxies, and
  under bubblewrap no process in the sandbox (its init included) ever had more;
- stdin from /dev/null; stdout and stderr captured to files (at most ``MAX_OUTPUT_BYTES``
  each may be written, ``KEEP_OUTPUT_CHARS`` of each are returned);
- resource limits set by the runner's first lines: address space (``RLIMIT_AS`` =
  memory_mb, set last), CPU seconds (the timeout rounded up, plus one), file size, no core
  dumps, and no new processes or threads (``RLIMIT_NPROC`` = 0; the kernel does not enforce
  it for root, one more reason for the switch to uid 65534). The parent enforces the
  wall-clock timeout by killing the sandbox's init (bubblewrap: the kernel then kills every
  process of the pid namespace before the call returns) or the process group (guard).
- the guard, before the program runs: process creation and signals disabled (``os.system``,
  ``os.popen``, ``os.fork``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``, ``os.kill``,
  ``os.killpg``, ``subprocess.*``, ``pty.spawn``, ``multiprocessing``'s fork and spawn),
  network disabled (``socket.socket``, ``create_connection``, ``getaddrinfo``, ...),
  ``ctypes`` unimportable, ``sys.settrace``/``setprofile`` refused a function (a trace
  function could rewrite the runner's variables; None is allowed), no setuid privileges
  (``PR_SET_NO_NEW_PRIVS``), and every call that writes, removes or renames a path
  (``open`` for writing, ``os.open`` with write flags, ``os.remove``/``unlink``/``rmdir``/
  ``mkdir``/``rename``/``replace``/``link``/``symlink``/``truncate``/``chmod``/``chown``,
  ``shutil.rmtree``) refused with PermissionError unless the path lies inside its directory.

How a pass is proved
--------------------
Not by the exit status, and not by a file the program can write. The parent makes a random
nonce per run and puts it in a pipe the child inherits; the runner reads it only after the
program (the answer and the tests appended to it) has run to its end, and sends it back over
a second inherited pipe with the outcome. ``SystemExit`` of any code, ``os._exit``, a signal,
a timeout, or a missing, late or wrong nonce is a failure. Nothing the program execs
inherits the pipes, the runner holds no file object for them (only their numbers), and the
nonce is not in the process's memory until the program is done.

What this does NOT protect against
----------------------------------
The runner and the program share one interpreter, so a program written to cheat can still
fake ``success`` under every layer: re-enter the runner (it is the ``__main__`` module), read
the nonce from the inherited descriptor and write the proof, or defeat tests run in the
same process (objects equal to anything). That is why HumanEval's tests never run here but
in ``nanochat.inference.answer_check``'s checker; ``success`` here means "ran to its end" for honest
programs only.

The guard alone is not a security boundary: a program can undo its patches (recover the
originals through ``gc``, ``posix``, ``_io``, ``_socket``) and then, as uid 65534 (root
caller), read world-readable files, write world-writable folders and use the network; as
any other uid (root too, where the switch failed), do what that uid can: read its files
(secrets on disk), write where it may, read /proc/<pid>/environ of its other processes (the
parent's included), and as root start processes that outlive the run. Under bubblewrap an
escape needs a kernel bug; the program still sees the read-only system and the
interpreter's files. Either way it can use up CPU and memory within its limits.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import one_line
from nanochat.inference.sandbox import (
    NOBODY,
    PROGRAM_INSIDE,
    WORK_INSIDE,
    Layer,
    SandboxError,
    bwrap_argv,
    sandbox_init,
    select_layer,
    stop,
)

MAX_OUTPUT_BYTES = 16 << 20  # RLIMIT_FSIZE: no file the child writes may grow past this
KEEP_OUTPUT_CHARS = 1 << 20  # of stdout and of stderr, returned to the caller
ERROR_CHARS = 300  # an error's one line
MAX_REPORT_BYTES = 1 << 20  # what the parent reads back from the proof pipe
CHILD_PATH = "/usr/bin:/bin"
# Imports what the runner has not: they must still work as uid 65534 (see "remap").
PROBE_PROGRAM = "import fractions, heapq, os\nprint(os.getuid())\n"
PROBE_TIMEOUT_S = 30.0  # generous: a busy machine must not make a working layer look broken


@dataclass(frozen=True)
class ExecutionResult:
    """What happened: ``success`` = the runner proved that the program ran to its end (no
    exception, no exit) in time, with this run's nonce.

    ``error`` is one line (an exception ``Type: message``, ``timed out after N s``, a
    signal or exit code, a missing proof) or None on success; ``memory_exceeded`` is True
    when it died of the memory limit (a MemoryError, or an allocation failure that crashed
    the interpreter).
    """

    success: bool
    stdout: str
    stderr: str
    error: str | None
    timeout: bool
    memory_exceeded: bool


# The child's code: limits, the uid switch, guards, the program, then the proof. Standard
# library only. Lines on the proof pipe: "started" (the first thing it does), "ready" (just
# before the program) or "setup-failed: <why>", then one JSON report.
_RUNNER = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
NONCE_FD, PROOF_FD = cfg["nonce_fd"], cfg["proof_fd"]
os.set_inheritable(NONCE_FD, False)  # a program the child execs gets neither pipe
os.set_inheritable(PROOF_FD, False)
os.write(PROOF_FD, b"started\n")
import resource

def _setup_failed(why):
    os.write(PROOF_FD, ("setup-failed: " + " ".join(str(why).split()) + "\n").encode())
    os._exit(1)

def _limit(which, soft, hard=None):
    try:
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass

_limit(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)
_limit(resource.RLIMIT_FSIZE, cfg["fsize"])
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, 0)

import builtins, io, pty, shutil, socket, subprocess, traceback
import _posixsubprocess, _socket

with open(cfg["program"], encoding="utf-8") as f:
    code = f.read()

if cfg["remap"]:
    # uid 65534 may not be allowed to walk to the interpreter's files (a Python under
    # /root): open each import folder now and import through /proc/self/fd/N, whose link
    # is followed without a permission check on the folders above it.
    _roots = {}
    for _entry in sys.path:
        if _entry and os.path.isdir(_entry):
            _fd = os.open(_entry, os.O_RDONLY | os.O_DIRECTORY)
            _roots[_entry.rstrip("/")] = f"/proc/self/fd/{_fd}"

    def _remap(path):
        for root in sorted(_roots, key=len, reverse=True):
            if path == root or path.startswith(root + "/"):
                return _roots[root] + path[len(root):]
        return path

    sys.path[:] = [_remap(p) for p in sys.path]
    for _module in list(sys.modules.values()):
        _path = getattr(_module, "__path__", None)
        if isinstance(_path, list):
            _path[:] = [_remap(p) for p in _path]
    sys.path_importer_cache.clear()

if cfg["drop"] is not None:
    try:
        os.setgroups([])
        os.setgid(cfg["drop"])
        os.setuid(cfg["drop"])
    except OSError as exc:
        _setup_failed(f"cannot switch to uid {cfg['drop']}: {exc}")
    if set(os.getresuid()) | set(os.getresgid()) != {cfg["drop"]} or os.getgroups():
        _setup_failed(f"still not uid {cfg['drop']} after the switch")

WORK = os.path.realpath(cfg["work"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_readlink, _realpath = os.readlink, os.path.realpath

def _absolute(path, dir_fd=None):
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(_readlink(f"/proc/self/fd/{dir_fd}"), path)
    return path

def _inside(real):
    return real == WORK or real.startswith(WORK + os.sep)

def _check(name, path, dir_fd=None, entry=False):
    # entry: the operation acts on the directory entry (remove, rename, mkdir), so the
    # parent folder is resolved and a symlink itself may go; otherwise links are followed.
    if isinstance(path, int):
        return
    try:
        path = _absolute(path, dir_fd)
        if entry:
            parent, leaf = os.path.split(os.path.abspath(path))
            real = os.path.join(_realpath(parent), leaf)
        else:
            real = _realpath(path)
    except (OSError, TypeError, ValueError):
        raise PermissionError(f"sandbox: {name} of {path!r} refused") from None
    if not _inside(real):
        raise PermissionError(f"sandbox: {name} outside the sandbox directory refused: {path!r}")

def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return refused

def _paths(module, name, positions, entry):
    original = getattr(module, name, None)
    if original is None:
        return
    def guarded(*args, **kwargs):
        dir_fd = kwargs.get("dir_fd")
        for i in positions:
            if i < len(args):
                _check(name, args[i], dir_fd, entry)
        for key in ("src", "dst", "path"):
            if key in kwargs:
                _check(name, kwargs[key], dir_fd, entry)
        return original(*args, **kwargs)
    setattr(module, name, guarded)

for _name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod"):
    _paths(os, _name, (0,), True)
for _name in ("rename", "replace", "link"):
    _paths(os, _name, (0, 1), True)
_paths(os, "symlink", (1,), True)
for _name in ("truncate", "chmod", "chown", "lchown", "utime"):
    _paths(os, _name, (0,), False)
_paths(shutil, "rmtree", (0,), True)

_os_open = os.open
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS:
        _check("os.open for writing", path, kwargs.get("dir_fd"))
    return _os_open(path, flags, *args, **kwargs)
os.open = _guarded_os_open

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _check("open for writing", file)
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

for _name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "posix_spawn",
              "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
              "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
              "spawnve", "spawnvp", "spawnvpe", "setuid", "setgid", "chroot"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse("os." + _name))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput",
              "getstatusoutput"):
    setattr(subprocess, _name, _refuse("subprocess." + _name))
pty.spawn = _refuse("pty.spawn")
_posixsubprocess.fork_exec = _refuse("_posixsubprocess.fork_exec")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd",
              "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    if hasattr(socket, _name):
        setattr(socket, _name, _refuse("socket." + _name + " (no network)"))
_socket.socket = _refuse("socket (no network)")
def _no_tracer(name, original):
    # Turning tracing off is harmless (doctest.testmod() calls settrace(None)); a trace
    # function could rewrite the runner's variables, so none may be set.
    def only_none(function):
        if function is not None:
            raise PermissionError(f"sandbox: {name} with a function is disabled")
        return original(None)
    return only_none
sys.settrace = _no_tracer("sys.settrace", sys.settrace)
sys.setprofile = _no_tracer("sys.setprofile", sys.setprofile)
try:  # no setuid program (su, mount) regains privileges; bubblewrap sets this already
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
except (ImportError, OSError, AttributeError):
    pass
sys.modules["ctypes"] = None
sys.modules["_ctypes"] = None

sys.argv = ["program.py"]
sys.stdout.reconfigure(errors="backslashreplace")
sys.stderr.reconfigure(errors="backslashreplace")

def _run(code, read=os.read, write=os.write, exit=os._exit, dumps=json.dumps):
    # What this needs once the program has run is bound before it runs (a program that
    # replaces os.write changes nothing here), and kept in locals, which a program cannot
    # rewrite without a trace function.
    status = {"error": None, "type": None}
    finished = False
    try:
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(code, "program.py", "exec"), namespace)
        finished = True
    except SystemExit as exc:
        status = {"error": f"SystemExit: {exc.code} (the program exited before its end)",
                  "type": "SystemExit"}
    except BaseException as exc:
        name = type(exc).__name__
        try:
            message = str(exc)
        except BaseException:
            message = ""
        status = {"error": f"{name}: {message}" if message else name, "type": name}
        try:  # the traceback from the program's own frames on (the runner's first one is noise)
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        except BaseException:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    proof = None
    if finished:  # the nonce enters this process only now, after the program is done
        try:
            proof = read(NONCE_FD, 64).decode("ascii", "replace")
        except OSError:
            pass
    write(PROOF_FD, (dumps({"status": status, "proof": proof}) + "\n").encode())
    exit(0 if finished else 1)

_limit(resource.RLIMIT_AS, cfg["memory"])  # last: the set-up above must not fail of it
os.write(PROOF_FD, b"ready\n")
_run(code)
"""


def _read(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(KEEP_OUTPUT_CHARS * 4 + 4)
    text = data.decode("utf-8", errors="replace")
    if len(text) > KEEP_OUTPUT_CHARS or path.stat().st_size > len(data):
        text = text[:KEEP_OUTPUT_CHARS] + "\n[output truncated]"
    return text


def _drain(fd: int) -> bytes:
    """What is in the pipe now, without waiting: a process the program left behind may
    still hold its write end (guard layer, root without the uid switch)."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < MAX_REPORT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _run(
    layer: Layer, code: str, timeout_s: float, memory_mb: int, pass_fds: tuple[int, ...] = ()
) -> ExecutionResult:
    """Run ``code`` once under ``layer``. SandboxError when the fence itself failed.
    ``pass_fds``: more descriptors the program inherits; closed here once it started."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="nanochat-exec-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        program = root / "program.py"
        program.write_text(code, encoding="utf-8")
        program.chmod(0o600)  # read by the runner before it switches to uid 65534
        if layer.name == "bwrap":
            work, program_path, cwd = WORK_INSIDE, PROGRAM_INSIDE, root
        else:
            cwd = root / "work"  # the program's cwd and the only place it may write
            cwd.mkdir()
            work, program_path = str(cwd), str(program)
            if layer.drop_uid:
                os.chown(cwd, NOBODY, NOBODY)
                root.chmod(0o711)  # uid 65534 walks through to its folder, lists nothing
        config = {
            "work": work,
            "program": program_path,
            "memory": memory_mb << 20,
            "cpu": math.ceil(timeout_s) + 1,
            "fsize": MAX_OUTPUT_BYTES,
            "drop": NOBODY if layer.drop_uid else None,
            "remap": layer.remap_imports,
        }
        env = {
            "PATH": CHILD_PATH,
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
        }
        nonce_r, nonce_w = os.pipe()
        proof_r, proof_w = os.pipe()
        info_r, info_w = os.pipe() if layer.name == "bwrap" else (-1, -1)
        open_fds = [nonce_r, nonce_w, proof_r, proof_w, info_r, info_w, *pass_fds]
        try:
            os.write(nonce_w, nonce.encode())  # 32 bytes: the pipe holds them until read
            config.update(nonce_fd=nonce_r, proof_fd=proof_w)
            command = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _RUNNER]
            command.append(json.dumps(config))
            child_fds = [nonce_r, proof_w, *pass_fds]
            if layer.name == "bwrap":
                command = bwrap_argv(layer, str(program), info_w, env, command)
                child_fds.append(info_w)
            timed_out = False
            init = None
            with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
                deadline = time.monotonic() + timeout_s
                proc = subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group, killed as a whole
                    close_fds=True,
                    pass_fds=child_fds,
                )
                for fd in [nonce_w, *child_fds]:  # the parent keeps only the read ends
                    os.close(fd)
                    open_fds.remove(fd)
                try:
                    if layer.name == "bwrap":
                        init = sandbox_init(info_r, deadline)
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    stop(proc, init)
            lines = _drain(proof_r).split(b"\n")
        finally:
            for fd in open_fds:
                if fd >= 0:
                    os.close(fd)
        stdout, stderr = _read(root / "stdout"), _read(root / "stderr")
    return _judge(
        layer=layer,
        nonce=nonce,
        lines=lines,
        returncode=proc.returncode,
        timed_out=timed_out,
        timeout_s=timeout_s,
        cpu_s=config["cpu"],
        stdout=stdout,
        stderr=stderr,
    )


def _judge(
    *,
    layer: Layer,
    nonce: str,
    lines: list[bytes],
    returncode: int,
    timed_out: bool,
    timeout_s: float,
    cpu_s: int,
    stdout: str,
    stderr: str,
) -> ExecutionResult:
    """The ExecutionResult of one run, from the proof pipe's lines and the exit status."""
    if not timed_out and lines[:2] != [b"started", b"ready"]:
        # Before "ready" no program code has run: this is the sandbox failing, not the
        # program (bubblewrap's own message is the first line of stderr, a crash of the
        # runner's set-up the last).
        said = stderr.strip().splitlines()
        if len(lines) > 1 and lines[1].startswith(b"setup-failed: "):
            why = lines[1].decode("utf-8", "replace").removeprefix("setup-failed: ")
        elif said:
            why = said[0] if lines[0] != b"started" else said[-1]
        else:
            why = f"exit status {returncode}"
        raise SandboxError(layer.name, one_line(why, ERROR_CHARS))
    report = None
    for line in reversed(lines[2:]):
        if line.strip():
            try:  # the program can write this pipe too: anything may be here
                report = json.loads(line)
            except (ValueError, RecursionError):
                pass
            break
    report = report if isinstance(report, dict) else {}
    status = report.get("status") if isinstance(report.get("status"), dict) else {}
    proof = report.get("proof")
    proven = isinstance(proof, str) and hmac.compare_digest(proof.encode(), nonce.encode())

    signum = -returncode if returncode < 0 else None
    if layer.name == "bwrap" and returncode > 128:
        signum = returncode - 128  # bubblewrap exits 128 + the signal that killed the child
    cpu_limit = signum == signal.SIGXCPU
    timeout = timed_out or cpu_limit
    memory_exceeded = status.get("type") == "MemoryError" or (
        not status and not timeout and "MemoryError" in stderr
    )
    if timed_out:
        error = f"timed out after {timeout_s:g} s"
    elif cpu_limit:
        error = f"CPU time limit ({cpu_s} s) exceeded"
    elif status.get("type") is not None:
        said = status.get("error") or status["type"]
        error = one_line(
            said if isinstance(said, str) else "a malformed report from the runner", ERROR_CHARS
        )
    elif returncode != 0:
        how = f"killed by signal {signum}" if signum else f"exited with code {returncode}"
        error = f"the program stopped before its end ({how})"
        if memory_exceeded:
            error += ": out of memory"
    elif not proven:
        error = "the program stopped before its end (no proof from the runner that it finished)"
    else:
        error = None
    return ExecutionResult(error is None, stdout, stderr, error, timeout, memory_exceeded)


def _probe(layer: Layer) -> str | None:
    """None when ``layer`` runs a trivial program as it should, else one line on why not."""
    try:
        result = _run(layer, PROBE_PROGRAM, PROBE_TIMEOUT_S, 512)
    except SandboxError as exc:
        return one_line(exc.why, ERROR_CHARS)
    except OSError as exc:
        return one_line(str(exc), ERROR_CHARS)
    if not result.success:
        return one_line(f"{result.error}; {result.stderr}", ERROR_CHARS)
    if layer.drop_uid and result.stdout != f"{NOBODY}\n":
        return f"the program ran as uid {result.stdout.strip()!r}, not {NOBODY}"
    return None


def active_layer() -> Layer:
    """The layer ``execute_code`` uses in this process (probed on the first call).
    UsageError when ``NANOCHAT_SANDBOX`` is unknown or asks for bwrap where it cannot run."""
    return select_layer(_probe)


def sandbox_description() -> str:
    """One line naming the active layer and what model code can still do, for the log."""
    return active_layer().description()


def execute_code(
    code: str, timeout_s: float = 5.0, memory_mb: int = 512, pass_fds: tuple[int, ...] = ()
) -> ExecutionResult:
    """Run ``code`` as a Python program in a fenced-in child process and report what happened.

    ``timeout_s`` is wall-clock time (sandbox and interpreter start included); ``memory_mb``
    caps the child's address space; ``pass_fds`` are descriptors the program inherits (this
    call closes them once the program started). Safe to call from several threads. Raises
    SandboxError when the fence itself failed (the run proves nothing either way). Read the
    module docstring, "What this does NOT protect against", before pointing it at hostile
    code.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < 1:
        raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")
    return _run(active_layer(), code, timeout_s, memory_mb, tuple(pass_fds))
