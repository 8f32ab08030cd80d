"""Fault probes against the code sandbox (nanochat/inference/execution.py over
nanochat/inference/sandbox.py): programs that try to get out, under each layer this machine
has (NANOCHAT_SANDBOX=bwrap, =guard; bwrap is skipped, with the reason, only where
bubblewrap cannot run). Answers that try to forge a HumanEval pass are in
test_faults_forged.py.

A probe escapes when its effect shows outside: a file outside the program's folder changed,
a connection reached a socket this test owns, a secret of the parent printed, a process of
the run alive after the call returned. Every program prints "attempt" first, so a probe that
died early cannot pass for a stopped one. The guard layer alone cannot stop some probes (no
namespaces); helpers.sandbox.admitted lists them with the reason (the layer's startup line
says it too), and only they may escape it. Nothing may escape bubblewrap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import REPO
from helpers.sandbox import admitted, verdict

from nanochat.inference import execution
from nanochat.inference.sandbox import NOBODY, Layer, find_bwrap

SYSTEM_PYTHON = "/usr/bin/python3"


def run(program: str, **kwargs) -> execution.ExecutionResult:
    result = execution.execute_code(program, **kwargs)
    assert result.stdout.startswith("attempt\n"), result  # the probe itself ran
    return result


# --- choosing the layer ------------------------------------------------------------------

SELECT = """\
import sys
sys.path.insert(0, sys.argv[1])
from nanochat.common import UsageError
from nanochat.inference.execution import sandbox_description
try:
    print(sandbox_description())
except UsageError as exc:
    print("UsageError:", exc)
"""

BROKEN_BWRAP = """\
#!/bin/sh
echo "bwrap: No permissions to create a new namespace" >&2
exit 1
"""


def describe(env: dict[str, str], path_first: Path | None = None) -> str:
    """The startup line (or the UsageError) of a fresh process with ``env``."""
    path = os.environ["PATH"] if path_first is None else f"{path_first}:{os.environ['PATH']}"
    proc = subprocess.run(
        [sys.executable, "-B", "-c", SELECT, str(REPO)],
        env={"PATH": path, "LANG": "C.UTF-8", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1, proc.stderr
    return proc.stdout.strip()


def test_an_unknown_sandbox_is_a_one_line_error():
    line = describe({"NANOCHAT_SANDBOX": "chroot"})
    assert line == "UsageError: NANOCHAT_SANDBOX='chroot': choose one of auto, bwrap, guard"


def test_a_bwrap_that_cannot_run_is_an_error_when_asked_for_and_named_when_not(tmp_path):
    # A stand-in that fails as bubblewrap does in a container without user namespaces.
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text(BROKEN_BWRAP)
    fake.chmod(0o755)
    reason = "bwrap does not work here: bwrap: No permissions to create a new namespace"
    asked = describe({"NANOCHAT_SANDBOX": "bwrap"}, path_first=fake.parent)
    assert asked == f"UsageError: NANOCHAT_SANDBOX=bwrap but {reason}"
    fallback = describe({}, path_first=fake.parent)
    assert fallback.startswith("sandbox: in-process guard") and f"({reason})" in fallback


def test_auto_picks_bubblewrap_where_it_runs():
    asked = describe({"NANOCHAT_SANDBOX": "bwrap"})
    if asked.startswith("UsageError"):
        pytest.skip(f"not run: {asked}")
    assert asked.startswith("sandbox: bubblewrap (new "), asked
    assert describe({}) == asked


# --- processes --------------------------------------------------------------------------


def test_fork_through_posix(layer):
    result = run(
        "import posix\n"
        "print('attempt', flush=True)\n"
        "pid = posix.fork()\n"
        "if pid == 0:\n"
        "    posix.write(1, b'child ran\\n')\n"
        "    posix._exit(0)\n"
        "posix.waitpid(pid, 0)\n"
    )
    verdict("posix_fork", layer, "child ran" in result.stdout)


def test_spawn_through_posix(layer):
    result = run(
        "import posix\n"
        "print('attempt', flush=True)\n"
        "try:\n"
        "    posix.system('echo child ran')\n"
        "finally:\n"
        "    posix.posix_spawn('/bin/sh', ['sh', '-c', 'echo child ran'], {})\n"
    )
    verdict("posix_fork", layer, "child ran" in result.stdout)


def _alive(marker: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline.split(b"\0")[-2:]:  # our marker, as the last arg
                pids.append(int(name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exec_python(code: str, *extra: str) -> str:
    """Program lines that replace the process by a fresh interpreter (no guard in it)
    running ``code``: this one, else the system's (uid 65534 may not reach this one)."""
    argv = ["-c", code, *extra]
    return (
        "import posix, sys\n"
        "print('attempt', flush=True)\n"
        f"for python in (sys.executable, {SYSTEM_PYTHON!r}):\n"
        "    try:\n"
        f"        posix.execv(python, [python, *{argv!r}])\n"
        "    except OSError as exc:\n"
        "        print('exec refused:', exc, flush=True)\n"
    )


GRANDCHILD = """\
import posix, sys
print('attempt', flush=True)
try:
    pid = posix.fork()
except OSError as exc:
    print('fork refused:', exc, flush=True)
else:
    if pid == 0:
        posix.setsid()
        if posix.fork() == 0:
            sleep = [sys.executable, '-c', 'import time; time.sleep(60)', MARKER]
            posix.execv(sys.executable, sleep)
        posix._exit(0)
    print('forked', flush=True)
"""


def test_a_setsid_grandchild_does_not_outlive_the_run(layer):
    marker = f"nanochat-probe-{uuid.uuid4().hex}"
    program = GRANDCHILD.replace("MARKER", repr(marker)) + "while True:\n    pass\n"
    result = run(program, timeout_s=1.0)
    assert result.timeout
    left = _alive(marker)
    _kill(left)
    verdict("grandchild", layer, bool(left))


@pytest.mark.parametrize("timeout_s", [1.0, 30.0], ids=["timed-out", "finished"])
def test_the_pid_namespace_takes_what_the_program_left_behind(timeout_s):
    """Behind RLIMIT_NPROC (which stops the grandchild above first), the second fence: a
    process that did get started dies with the sandbox's pid namespace before execute_code
    returns. Run as root without the uid switch, where RLIMIT_NPROC does not hold."""
    bwrap = find_bwrap()
    if os.geteuid() != 0 or bwrap is None:
        pytest.skip("not run: needs root (RLIMIT_NPROC stops every fork otherwise) and bwrap")
    layer = Layer("bwrap", drop_uid=False, bwrap=bwrap)
    marker = f"nanochat-probe-{uuid.uuid4().hex}"
    program = GRANDCHILD.replace("MARKER", repr(marker))
    if timeout_s < 5:
        program += "while True:\n    pass\n"
    try:
        result = execution._run(layer, program, timeout_s, 512)
    except execution.SandboxError as exc:
        pytest.skip(f"not run: bubblewrap with a user namespace does not work here: {exc.why}")
    assert "forked" in result.stdout, result  # the grandchild was started
    assert result.timeout == (timeout_s < 5)
    left = _alive(marker)
    _kill(left)
    assert not left, "a process of the run outlived it"


def test_a_program_that_execs_itself_away_is_killed_on_time_out(layer):
    marker = f"nanochat-probe-{uuid.uuid4().hex}"
    program = _exec_python("import time; time.sleep(60)", marker) + "while True:\n    pass\n"
    result = run(program, timeout_s=1.0)
    assert result.timeout and not result.success
    left = _alive(marker)
    _kill(left)
    verdict("outlives", layer, bool(left))


# --- files outside the program's folder --------------------------------------------------


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "outside" / "keep.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def test_write_through_posix_open(layer, victim):
    run(
        "import posix\n"
        "print('attempt', flush=True)\n"
        f"fd = posix.open({str(victim)!r}, posix.O_WRONLY | posix.O_TRUNC)\n"
        "posix.write(fd, b'pwned')\n"
    )
    verdict("posix_write", layer, victim.read_text() != "precious")


def test_create_through_io_fileio(layer, victim):
    new = victim.parent / "new.txt"
    run(f"import io\nprint('attempt', flush=True)\nio.FileIO({str(new)!r}, 'w').write(b'pwned')\n")
    verdict("fileio_create", layer, new.exists())


def test_delete_through_posix_unlink(layer, victim):
    run(f"import posix\nprint('attempt', flush=True)\nposix.unlink({str(victim)!r})\n")
    verdict("posix_unlink", layer, not victim.exists())


def test_rename_through_posix(layer, victim):
    moved = victim.parent / "moved.txt"
    run(
        "import posix\nprint('attempt', flush=True)\n"
        f"posix.rename({str(victim)!r}, {str(moved)!r})\n"
    )
    verdict("posix_rename", layer, not victim.exists() or moved.exists())


def test_a_fresh_interpreter_execd_without_the_guard_cannot_write_outside(layer, victim):
    run(_exec_python(f"open({str(victim)!r}, 'w').write('pwned')"))
    verdict("exec_write", layer, victim.read_text() != "precious")


# --- network --------------------------------------------------------------------------


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _connected(server: socket.socket) -> bool:
    """Whether anyone connected: the kernel queues a finished handshake until accept()."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_a_socket_found_through_object_subclasses(layer, listener):
    port = listener.getsockname()[1]
    run(
        "print('attempt', flush=True)\n"
        "S = next(c for c in object.__subclasses__()\n"
        "         if c.__module__ == '_socket' and c.__name__ == 'socket')\n"
        "s = S(2, 1)\n"  # AF_INET, SOCK_STREAM
        f"s.connect(('127.0.0.1', {port}))\n"
        "s.sendall(b'escaped')\n"
    )
    verdict("socket", layer, _connected(listener))


# --- the parent's secrets --------------------------------------------------------------

ENVIRON_PROBE = """\
import os
print('attempt', flush=True)
names = {'PARENT_PID', str(os.getppid()), '1', 'self', *os.listdir('/proc')}
for name in sorted(names):
    try:
        with open(f'/proc/{name}/environ', 'rb') as f:
            data = f.read()
    except OSError:
        continue
    if b'WANDB_API_KEY' in data:
        print(name, data.decode('latin-1'))
"""

PARENT = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
from nanochat.inference.execution import execute_code, sandbox_description
program = sys.stdin.read().replace("PARENT_PID", str(os.getpid()))
result = execute_code(program)
print(json.dumps({"line": sandbox_description(), "stdout": result.stdout,
                  "stderr": result.stderr, "error": result.error}))
"""


def run_in_parent(python: str, program: str, env: dict[str, str], **popen) -> dict:
    """``program`` run by execute_code in a parent process whose environment is ``env``
    (its /proc/<pid>/environ is fixed when it starts, unlike this test process's)."""
    proc = subprocess.run(
        [python, "-B", "-c", PARENT, str(REPO)],
        input=program,
        env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **env},
        capture_output=True,
        text=True,
        timeout=120,
        **popen,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_parents_environment_stays_out_of_reach(layer, tmp_path):
    secret = f"probe-secret-{uuid.uuid4().hex}"
    env = {"NANOCHAT_SANDBOX": layer.name, "WANDB_API_KEY": secret, "HOME": str(tmp_path)}
    result = run_in_parent(sys.executable, ENVIRON_PROBE, env)
    assert result["stdout"].startswith("attempt\n"), result
    assert result["line"] == layer.description()
    verdict("environ", layer, secret in result["stdout"] + result["stderr"])


# --- bubblewrap as an unprivileged user ---------------------------------------------------


@pytest.mark.parametrize("name", ["bwrap", "guard"])
def test_an_unprivileged_caller(name, tmp_path, listener):
    """What a user who is not root gets: bubblewrap in a user namespace, or the guard with
    the caller's own uid. Run as uid 65534 with the system Python (this test's interpreter
    may lie where uid 65534 cannot reach)."""
    if os.geteuid() != 0:
        pytest.skip("not run: switching to an unprivileged uid needs root (this run is that user)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"not run: no {SYSTEM_PYTHON} to run as uid {NOBODY}")
    if name == "bwrap" and find_bwrap() is None:
        pytest.skip("the bubblewrap layer was not run: bwrap not found")
    home = Path(tempfile.mkdtemp(prefix="nanochat-unprivileged-"))  # reachable for uid 65534
    try:
        os.chmod(home, 0o755)
        victim = home / "keep.txt"
        victim.write_text("precious")
        os.chown(home, NOBODY, NOBODY)
        os.chown(victim, NOBODY, NOBODY)
        secret = f"probe-secret-{uuid.uuid4().hex}"
        port = listener.getsockname()[1]
        program = ENVIRON_PROBE + (
            "import posix\n"
            "try:\n"
            "    if posix.fork() == 0:\n"
            "        posix.write(1, b'child ran\\n')\n"
            "        posix._exit(0)\n"
            "except OSError:\n"
            "    pass\n"
            "try:\n"
            f"    fd = posix.open({str(victim)!r}, posix.O_WRONLY | posix.O_TRUNC)\n"
            "    posix.write(fd, b'pwned')\n"
            "except OSError:\n"
            "    pass\n"
            "S = next(c for c in object.__subclasses__()\n"
            "         if c.__module__ == '_socket' and c.__name__ == 'socket')\n"
            f"S(2, 1).connect(('127.0.0.1', {port}))\n"
        )
        env = {"NANOCHAT_SANDBOX": name, "WANDB_API_KEY": secret, "HOME": str(home)}
        result = run_in_parent(
            SYSTEM_PYTHON, program, env, user=NOBODY, group=NOBODY, extra_groups=[], cwd=home
        )
        assert result["stdout"].startswith("attempt\n"), result
        layer = Layer(name, drop_uid=False, why="probe")
        assert result["line"].startswith(layer.description().split("(")[0]), result["line"]
        escapes = {
            "posix_fork": "child ran" in result["stdout"],
            "posix_write": victim.read_text() != "precious",
            "environ": secret in result["stdout"] + result["stderr"],
            "socket": _connected(listener),
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)
    unexpected = {p for p, escaped in escapes.items() if escaped and p not in admitted(layer)}
    assert not unexpected, f"escaped the unprivileged {name} layer: {sorted(unexpected)}"
    assert not escapes["posix_fork"]  # RLIMIT_NPROC holds for any uid but root
