"""The local backend: exit codes, environment, signal forwarding, and a real torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from backends import command, local
from backends.stages import Stage


def make_command(tmp_path, code: str, **env) -> command.StageCommand:
    """A stage command whose entry module is a file we write (the stage table's own
    modules are exercised by their stage tests)."""
    (tmp_path / "probe_stage.py").write_text(textwrap.dedent(code))
    stage = Stage("probe", "probe_stage", "test probe", "cpu")
    cmd = command.build(stage, "tiny", {}, 1, tmp_path / "base", omp_threads=3)
    cmd.env.update({"PYTHONPATH": str(tmp_path), **env})
    return cmd


def test_exit_code_and_environment(tmp_path, capfd):
    cmd = make_command(
        tmp_path,
        """
        import os, shutil, sys
        print("base", os.environ["NANOCHAT_BASE_DIR"])
        print("omp", os.environ["OMP_NUM_THREADS"])
        print("python", os.path.realpath(shutil.which("python")))
        sys.exit(3)
    """,
    )
    assert cmd.argv == ["python", "-m", "probe_stage"]
    assert local.run(cmd) == 3
    out = capfd.readouterr().out
    assert f"base {tmp_path / 'base'}" in out
    assert f"omp {os.environ.get('OMP_NUM_THREADS', '3')}" in out
    assert f"python {os.path.realpath(sys.executable)}" in out


RUNNER = """
import sys
sys.path.insert(0, {repo!r})
from backends import command, local
from backends.stages import Stage
stage = Stage("probe", "probe_stage", "test probe", "cpu")
cmd = command.build(stage, "tiny", {{}}, 1, {base!r}, omp_threads=1)
cmd.env["PYTHONPATH"] = {tmp!r}
sys.exit(local.run(cmd))
"""

CHILD = """
import pathlib, signal, subprocess, sys, time
out = pathlib.Path({tmp!r})
# A grandchild in the same process group must be stopped too (torchrun's workers).
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
(out / "grandchild.pid").write_text(str(grandchild.pid))
def stop(signum, frame):
    (out / "got").write_text(signal.Signals(signum).name)
    grandchild.wait(timeout=10)
    sys.exit(7)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
(out / "ready").write_text("1")
time.sleep(60)
"""


def _start_runner(tmp_path):
    from conftest import REPO

    (tmp_path / "probe_stage.py").write_text(CHILD.format(tmp=str(tmp_path)))
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUNNER.format(repo=str(REPO), base=str(tmp_path / "base"), tmp=str(tmp_path)),
        ]
    )
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline, "probe stage never started"
        assert runner.poll() is None
        time.sleep(0.05)
    return runner


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
        return f.read().split()[2] == "Z"


def test_sigterm_is_forwarded_and_its_exit_code_returned(tmp_path):
    runner = _start_runner(tmp_path)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 7
    assert (tmp_path / "got").read_text() == "SIGTERM"
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.time() + 10
    while not _gone(grandchild):
        assert time.time() < deadline, "grandchild survived the forwarded signal"
        time.sleep(0.05)


def test_ctrl_c_is_forwarded(tmp_path):
    runner = _start_runner(tmp_path)
    runner.send_signal(signal.SIGINT)
    assert runner.wait(timeout=30) == 7
    assert (tmp_path / "got").read_text() == "SIGINT"


def test_killed_child_reports_128_plus_signal(tmp_path):
    cmd = make_command(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert local.run(cmd) == 128 + signal.SIGKILL


def test_real_torchrun_passes_flags_after_the_double_dash(tmp_path):
    """The exact torchrun line the backend builds works: 2 processes, flags parsed by the
    scripts' shared parser even though torchrun hands them over after a literal '--'."""
    (tmp_path / "probe_stage.py").write_text(
        textwrap.dedent(f"""
        import os, pathlib
        from nanochat.common import CliParser
        parser = CliParser(prog="probe")
        parser.add_argument("--depth", type=int, required=True)
        args = parser.parse_args()
        rank = os.environ["RANK"]
        pathlib.Path({str(tmp_path)!r}, "rank" + rank).write_text(
            f"{{args.depth}} {{os.environ['WORLD_SIZE']}} {{os.environ['OMP_NUM_THREADS']}}")
    """)
    )
    stage = Stage("probe", "probe_stage", "test probe", "gpus", knobs=("depth",))
    cmd = command.build(stage, "tiny", {"depth": 12}, 2, tmp_path / "base", omp_threads=1)
    assert cmd.argv == [
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "probe_stage",
        "--",
        "--depth=12",
    ]
    cmd.env.update({"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert local.run(cmd) == 0
    assert (tmp_path / "rank0").read_text() == "12 2 1"
    assert (tmp_path / "rank1").read_text() == "12 2 1"


def _run_in_terminal(tmp_path, stage_code: str, dialogue: list[tuple[str, bytes]]):
    """Run the local backend under a real pseudo-terminal, as a user's shell would: wait for
    each expected text on the screen, then type the given bytes. Returns (exit code, screen)."""
    import pty
    import select

    from conftest import REPO

    (tmp_path / "probe_stage.py").write_text(textwrap.dedent(stage_code))
    runner = RUNNER.format(repo=str(REPO), base=str(tmp_path / "base"), tmp=str(tmp_path))
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the session leader of the new terminal
        os.execv(sys.executable, [sys.executable, "-c", runner])
    screen = b""
    try:
        for expect, typed in dialogue:
            deadline = time.time() + 30
            while expect.encode() not in screen:
                assert time.time() < deadline, f"never saw {expect!r}; screen: {screen!r}"
                if select.select([fd], [], [], 0.1)[0]:
                    screen += os.read(fd, 4096)
            os.write(fd, typed)
        while True:  # drain until the terminal closes
            if select.select([fd], [], [], 30)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: every process on the terminal has exited
                    break
                if not chunk:
                    break
                screen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


def test_at_a_terminal_the_stage_can_read_the_keyboard(tmp_path):
    """An interactive stage (chat-cli) stays in the terminal's foreground group: reading
    the keyboard works instead of stopping it with SIGTTIN."""
    code, screen = _run_in_terminal(
        tmp_path,
        """
        import sys
        print("prompt>", flush=True)
        print("got:" + sys.stdin.readline().strip(), flush=True)
        """,
        [("prompt>", b"hello\n")],
    )
    assert code == 0, screen
    assert "got:hello" in screen


def test_at_a_terminal_ctrl_c_reaches_the_stage_once(tmp_path):
    code, screen = _run_in_terminal(
        tmp_path,
        """
        import signal, sys, time
        hits = []
        def stop(signum, frame):
            hits.append(signum)
            time.sleep(0.5)  # a clean shutdown takes a moment; a forwarded copy would land here
            print(f"interrupted {len(hits)}", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGINT, stop)
        print("ready", flush=True)
        time.sleep(60)
        """,
        [("ready", b"\x03")],
    )
    assert code == 7, screen
    assert "interrupted 1" in screen
