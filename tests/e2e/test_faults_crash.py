"""Fault class "crash": killed launchers, killed torchrun, two runs on one tag, stale locks,
and the exit codes a crash ends with. Real processes (make, torchrun, the trainer) on a toy
corpus; a deadline only bounds how long a test waits for what must happen."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, cli_env, run_cli
from helpers.pretrain import SMALL, holder_pid, lock_of, train
from helpers.waiting import wait_for

from nanochat.training import checkpoint, run_lock

LONG = [*SMALL, "--num-steps=100000", "--eval-every=0", "--save-every=2", "--core-every=0",
        "--sample-every=0"]  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def a_checkpoint(base: Path, tag: str = "d2"):
    return checkpoint.latest(checkpoint.checkpoint_dir(base, "base", tag), check_hash=False)


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killing_the_launchers_whole_group_ends_the_trainer(toy):
    """`setsid make pretrain ...; kill -9 -<pgid>`: the trainer (in a session of its own)
    gets SIGTERM from the kernel, saves at the end of its step and exits; nothing keeps
    writing the tag, and the same command then resumes."""
    make = start(
        ["make", "pretrain", f"BASE_DIR={toy}", f"ARGS={' '.join(LONG)}"],
        start_new_session=True,
    )
    pid = wait_for(lambda: a_checkpoint(toy) and holder_pid(toy), "the trainer's first save")
    assert pid != make.pid
    os.killpg(make.pid, signal.SIGKILL)
    make.wait(timeout=30)
    wait_for(lambda: not alive(pid), f"the orphaned trainer (pid {pid}) to exit")
    assert not lock_of(toy).exists()  # it released the tag on its way out
    saved = a_checkpoint(toy).step
    again = run_cli(
        ["make", "pretrain", f"BASE_DIR={toy}", f"ARGS={' '.join(LONG)} --stop-at={saved + 1}"]
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {saved}" in again.stderr


def test_a_worker_ends_when_torchrun_is_killed(toy):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = start(
        [torchrun, "--standalone", "--nproc-per-node=1", "-m", "scripts.base_train", *LONG],
        start_new_session=True,
    )
    pid = wait_for(lambda: a_checkpoint(toy) and holder_pid(toy), "the worker's first save")
    assert pid != proc.pid
    os.kill(proc.pid, signal.SIGKILL)  # torchrun alone: its worker is not signalled by us
    proc.wait(timeout=30)
    try:
        wait_for(lambda: not alive(pid), f"the worker (pid {pid}) to exit after torchrun")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_second_run_on_the_same_tag_is_refused_until_the_first_ends(toy):
    first = start([sys.executable, "-m", "scripts.base_train", *LONG])
    try:
        pid = wait_for(lambda: holder_pid(toy), "the first run to take the tag")
        second = train(LONG)
        assert second.returncode == 2, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: another run is using the checkpoints of")
        assert f"pid {pid} on {socket.gethostname()}" in last and "--tag" in last
        assert first.poll() is None  # the refusal did not disturb the run
        assert train([*LONG, "--tag=other", "--stop-at=1"]).returncode == 0  # other tags run
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    saved = a_checkpoint(toy).step
    again = train([*LONG, f"--stop-at={saved + 1}"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {saved}" in again.stderr


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(path: Path, age_s: float = 0.0, **record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": time.time() - age_s, "command": "x", **record}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_lock_left_by_a_crashed_run_on_this_machine_is_taken_over(toy):
    write_lock(
        lock_of(toy),
        host=socket.gethostname(),
        boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        pid_ns=str(os.stat("/proc/self/ns/pid").st_ino),
        pid=dead_pid(),
    )
    result = train([*LONG, "--stop-at=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "took over the lock on d2 held by process" in result.stderr
    assert not lock_of(toy).exists()


def test_a_lock_from_another_machine_is_stale_only_when_its_heartbeat_stopped(toy):
    elsewhere = {"host": "node-b", "boot_id": "other", "pid": os.getpid()}
    write_lock(lock_of(toy), age_s=30, **elsewhere)  # beating 30 s ago: a live run
    result = train([*LONG, "--stop-at=1"])
    assert result.returncode == 2
    assert "on node-b" in result.stderr.strip().splitlines()[-1]
    write_lock(lock_of(toy), age_s=run_lock.STALE_S + 60, **elsewhere)
    result = train([*LONG, "--stop-at=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "took over the lock on d2 held by host node-b, silent for" in result.stderr


def test_a_retried_attempt_of_the_same_run_takes_its_own_lock_back(toy):
    """Modal retries a preempted stage in a new container (another host) within seconds:
    the run id, not the heartbeat, says it is the same run."""
    write_lock(lock_of(toy), host="container-1", boot_id="b", pid=7, run_id="fc-123")
    result = train([*LONG, "--stop-at=1"], env={run_lock.RUN_ID_ENV: "fc-123"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "an earlier attempt of this same run (fc-123)" in result.stderr


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = run_lock.RunLock(tmp_path / "base_checkpoints" / "t")
    lock.acquire()
    try:
        os.utime(lock.path, (0, 0))
        wait_for(lambda: time.time() - lock.path.stat().st_mtime < 60, "a heartbeat", 10)
        assert lock.holds()
    finally:
        lock.release()
    assert not lock.path.exists()


def test_sigterm_to_make_alone_stops_the_stage_cleanly(toy):
    """make dies of it at once (its recipe shell too); the stage must not run on unwatched:
    the launcher, orphaned, gets SIGTERM from the kernel and hands it to the stage."""
    make = start(["make", "pretrain", f"BASE_DIR={toy}", f"ARGS={' '.join(LONG)}"])
    pid = wait_for(lambda: a_checkpoint(toy) and holder_pid(toy), "the trainer's first save")
    make.send_signal(signal.SIGTERM)
    make.wait(timeout=30)
    wait_for(lambda: not alive(pid), f"the trainer (pid {pid}) to stop after make")
    assert not lock_of(toy).exists()


def test_a_busy_tag_stops_every_torchrun_worker_with_one_line(toy):
    """Rank 0 finds the tag taken; the other rank must not go on without the lock."""
    first = start([sys.executable, "-m", "scripts.base_train", *LONG])
    try:
        wait_for(lambda: holder_pid(toy), "the first run to take the tag")
        torchrun = str(Path(sys.executable).parent / "torchrun")
        argv = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "scripts.base_train"]
        second = subprocess.run(
            [*argv, *LONG], cwd=REPO, env=cli_env({"OMP_NUM_THREADS": "1"}),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode != 0
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "another run is using the checkpoints" in errors[0]
        assert "Connection closed by peer" not in second.stderr, second.stderr[-3000:]
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
