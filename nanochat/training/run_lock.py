"""One training run per checkpoint tag at a time: a lock file held for the whole run.

Two trainers writing the same ``<kind>_checkpoints/<tag>/`` (a rerun while an earlier one
still runs, two terminals, an orphan left by a killed launcher) would interleave their
checkpoints and prune each other's. Every training stage takes this lock through
``checkpoint.start_point`` before it looks at the folder, and holds it until it exits.

The lock is a small JSON file beside the tag's folder, ``<kind>_checkpoints/.<tag>.lock``,
created with O_EXCL (atomic on a local disk and on NFS v3+). It records who holds it (host,
boot id, pid namespace, pid and the pid's start time, the command, a run id) and a
heartbeat: its mtime, touched every ``HEARTBEAT_S`` by a daemon thread. A lock is stale,
and taken over with a note, when

- its holder ran on this machine (same host, boot and pid namespace) and that process is
  gone, or
- its holder ran elsewhere (another container or node: its pid means nothing here) and the
  heartbeat stopped more than ``STALE_S`` ago, or
- it carries our own run id: the same Modal function call, retried after a preemption, or
- it is empty or torn and older than ``UNREADABLE_STALE_S`` (a start killed between creating
  the file and writing its record; a full disk there removes the file instead).

Otherwise the run stops before any work with one line naming the holder and what to do.

On a Modal volume the file is only as good as the volume's consistency: another container
sees it after the holder's next commit (the backend commits with every checkpoint), and its
heartbeat from then on, so two runs of one tag started at the same moment from two laptops
are not stopped there; the speedrun's own lease (``backends.modal_app``) keeps one speedrun
per workspace.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from nanochat.common import UsageError, disk_full, log

HEARTBEAT_S = 30.0  # how often a holder touches its lock
STALE_S = 300.0  # a lock from another machine whose heartbeat stopped this long ago is stale
UNREADABLE_STALE_S = 10.0  # an empty or torn lock file this old was left by a killed start
RUN_ID_ENV = "NANOCHAT_RUN_ID"  # set by a backend that retries a run (Modal: the call id)


def lock_path(directory: Path) -> Path:
    """``<kind>_checkpoints/.<tag>.lock`` for the tag folder ``directory``: outside the
    folder, so setting the folder aside (--resume=never) does not move the lock."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat):
    tells a live holder from a new process that reuses its pid. '' when unknown."""
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return not (started and now and now != started)


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return str(os.stat("/proc/self/ns/pid").st_ino)
    return ""


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "pid_start": _start_time(pid),
        "run_id": os.environ.get(RUN_ID_ENV, ""),
        "started": time.time(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
    }


def _why_stale(holder: dict | None, age_s: float, me: dict) -> str | None:
    """Why the lock with record ``holder`` (None: unreadable) and heartbeat ``age_s``
    seconds old may be taken over, or None when its holder may still be running."""
    if holder is None:  # a holder writes its record at once: this one was cut short
        if age_s > UNREADABLE_STALE_S:
            return f"an unreadable lock file, untouched for {age_s:.0f} s"
        return None
    if me["run_id"] and holder.get("run_id") == me["run_id"]:
        return f"an earlier attempt of this same run ({me['run_id']})"
    here = all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
    if here:
        pid = int(holder.get("pid", 0))
        if pid and not _alive(pid, str(holder.get("pid_start", ""))):
            return f"process {pid}, which is gone"
        return None
    if age_s > STALE_S:
        return f"host {holder.get('host')}, silent for {age_s / 60:.0f} min"
    return None


GONE = {"gone": True}  # _read's answer when the file vanished (released meanwhile)


def _load(path: Path) -> dict | None:
    """A lock file's record; None when it is missing, unreadable or not a JSON object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """The lock on one tag; ``acquire`` raises UsageError (one line) when a live run holds it."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = lock_path(self.directory)
        self.record: dict | None = None
        self._stop = threading.Event()

    def acquire(self) -> None:
        me = _me()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create(me):
                self.record = me
                self._start_heartbeat()
                atexit.register(self.release)
                return
            holder, age_s = self._read()
            if holder is GONE:
                continue  # released between our try and our look: try again
            reason = _why_stale(holder, age_s, me)
            if reason is None:
                raise UsageError(self._busy_message(holder, age_s))
            # Move the stale lock away under a unique name: of two runs taking over at
            # once, only one rename succeeds; the other finds the new lock on its next try.
            stale = self.path.with_name(f"{self.path.name}.stale-{me['pid']}")
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                continue
            moved = _load(stale)
            if moved != holder:  # another run took over in between: that lock is live
                with contextlib.suppress(OSError):
                    os.link(stale, self.path)  # put it back, unless a third run came
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
            log(f"took over the lock on {self.directory.name} held by {reason}")
        raise UsageError(f"could not take the lock {self.path}: other runs keep taking it")

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk: no empty lock left to block the rerun
            self.path.unlink(missing_ok=True)
            raise (disk_full(exc, self.path, writing=True) or exc) from None
        return True

    def _read(self) -> tuple[dict | None, float]:
        """(the holder's record, or None when unreadable, or GONE; heartbeat age in s)."""
        try:
            age_s = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return GONE, 0.0
        except OSError:
            return None, 0.0
        holder = _load(self.path)
        return (holder, age_s)

    def _busy_message(self, holder: dict | None, age_s: float) -> str:
        if holder is None:
            who = "a run whose lock file is unreadable"
        else:
            when = time.strftime("%H:%M", time.localtime(float(holder.get("started", 0))))
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')} since {when} "
                f"(`{holder.get('command', '?')}`, alive {age_s:.0f} s ago)"
            )
        return (
            f"another run is using the checkpoints of {self.directory}: {who}; wait for it or "
            f"stop it, or use another --tag (if you are sure no such run exists, delete "
            f"{self.path})"
        )

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()

    def holds(self) -> bool:
        """True while the file on disk is still ours (nobody took it over)."""
        holder, _ = self._read()
        return bool(
            self.record
            and holder
            and holder.get("pid") == self.record["pid"]
            and holder.get("host") == self.record["host"]
            and holder.get("started") == self.record["started"]
        )

    def release(self) -> None:
        self._stop.set()
        mine = self.record is not None and self.record["pid"] == os.getpid()  # not a fork's
        if mine and self.holds():
            self.path.unlink(missing_ok=True)
        self.record = None


_held: dict[Path, RunLock] = {}


def hold(directory: Path) -> RunLock:
    """Take the lock on ``directory``'s tag for the rest of this process (released at exit,
    or by ``release_all``); a second call for the same tag is a no-op."""
    key = lock_path(directory).resolve()
    if key not in _held:
        lock = RunLock(directory)
        lock.acquire()
        _held[key] = lock
    return _held[key]


def release_all() -> None:
    """Release every lock this process holds (the end of a run)."""
    while _held:
        _held.popitem()[1].release()
