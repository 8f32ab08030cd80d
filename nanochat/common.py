"""Small helpers every stage shares: where artifacts live, atomic writes, one-line CLI errors.

Standard library only, so the orchestration layer (tasks.py, backends/) can import it on a
laptop without the training dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BASE_DIR_ENV = "NANOCHAT_BASE_DIR"
DEFAULT_BASE_DIR = Path("~/.cache/nanochat")
# The trained stages whose checkpoints live in BASE_DIR/<kind>_checkpoints/, in pipeline order
# (base = pretraining). Backends read it too, so it lives here, without torch.
CHECKPOINT_KINDS = ("base", "mid", "sft", "rl")


def base_dir() -> Path:
    """The artifacts root: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat (see README, Artifacts)."""
    return Path(os.environ.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR).expanduser()


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, nothing touched."""


class StageFailed(RuntimeError):
    """The work failed for a reason its message states in one line (the input was fine):
    ``run_main`` prints it as one ``error:`` line and exits 1."""


class ArtifactError(StageFailed):
    """An artifact on disk that fails its check (a damaged shard or tokenizer file): the
    message names it and the fix."""


def die(message: str, code: int = 2) -> None:
    """Print one clear line to stderr and exit (2 = bad input, 1 = the work failed)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_main(main) -> None:
    """A stage script's entry point: exit with ``main()``'s code. One ``error:`` line on
    stderr instead of a traceback for: a UsageError (bad input; from rank 0 only under
    torchrun), exit 2; a failure that says why (StageFailed: a damaged artifact, a sandbox
    that did not start), exit 1; a full disk (DiskFullError, or any OSError with ENOSPC or
    EDQUOT), exit 1, and the same command resumes once there is space. The last two from
    whichever rank met them."""
    try:
        code = main()
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except StageFailed as exc:  # from any rank: ranks read different shards
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except (OSError, RuntimeError) as exc:
        full = exc if isinstance(exc, DiskFullError) else disk_full(exc)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    raise SystemExit(code)


def stamp(message: str) -> str:
    """``[HH:MM:SS] message``: the prefix of every progress line."""
    return f"[{time.strftime('%H:%M:%S')}] {message}"


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout is kept for results)."""
    print(stamp(message), file=sys.stderr, flush=True)


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An exception (or text) squeezed onto one line of at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit 2) instead of the usage block.

    Also drops a leading ``--``: ``torchrun -m scripts.x -- --depth=12`` hands the
    script ``['--', '--depth=12']``, which plain argparse would read as positionals.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["--"]:
            args = args[1:]
        return super().parse_args(args, namespace)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


RESUME_ENV = "NANOCHAT_RESUME"  # the --resume default: FORCE sets it, Modal's retries too
# Where a stage's processes ask their container to commit the checkpoint volume (Modal;
# nanochat.training.checkpoint.commit_files); unset elsewhere.
COMMIT_DIR_ENV = "NANOCHAT_COMMIT_DIR"


def resume_policy(text: str) -> str:
    """argparse type for --resume: ``auto`` | ``never`` | ``since:<unix seconds>``."""
    if text in ("auto", "never"):
        return text
    kind, _, when = text.partition(":")
    try:
        if kind == "since" and float(when) >= 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected auto, never or since:<unix time>, got {text!r}")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """The --resume flag every training stage shares (default from NANOCHAT_RESUME)."""
    parser.add_argument(
        "--resume",
        type=resume_policy,
        default=os.environ.get(RESUME_ENV, "auto"),
        metavar="{auto,never,since:T}",
        help="auto: continue from the latest complete checkpoint of this tag (default); "
        "never: start over, moving this tag's checkpoints aside (nothing is deleted); "
        "since:T: continue only from a checkpoint saved at or after unix time T",
    )


def add_checkpoint_arguments(parser) -> None:
    """The flags that pick the checkpoint a stage loads, the same in every script that loads
    one by kind (chat-cli, chat-eval, chat-web, export): ``-i/--source`` (base, mid, sft, rl
    or auto, the most trained kind there is), ``--tag`` and ``--step``. ``parser`` may be an
    argument group."""
    parser.add_argument(
        "-i",
        "--source",
        choices=(*CHECKPOINT_KINDS, "auto"),
        default="auto",
        help="which stage's checkpoint: base, mid, sft, rl, or auto = the first of rl, sft, "
        "mid, base that exists (default: auto)",
    )
    parser.add_argument(
        "--tag", help="checkpoint folder, e.g. d20 (default: the most recently written one)"
    )
    parser.add_argument(
        "--step",
        type=non_negative_int,
        help="training step of the checkpoint (default: the latest complete one)",
    )


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 usually means "off")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file, read in 4 MiB blocks: the integrity record of checkpoints,
    shards and downloads."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: Path | str) -> int | None:
    """Free space (for this user) on the file system holding ``path`` or its nearest
    existing parent; None where the file system does not say (statvfs fails, or reports a
    size of 0, as some FUSE and network volumes do)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.free if usage.total > 0 else None


class DiskFullError(OSError):
    """No room to write an artifact: one line naming the path, the free space there and,
    when known, how much is needed (``note`` adds where, e.g. "on another rank"). Without a
    path (a full /dev/shm, say) the original error's text names what was written."""

    def __init__(self, path: Path | str | None, needed: int | None = None, note: str | None = None):
        if path is None:
            what = f"({note})" if note else ""
        else:
            free = free_bytes(Path(path).parent)
            there = "free space unknown" if free is None else f"{human_bytes(free)} free there"
            need = f", about {human_bytes(needed)} needed" if needed else ""
            extra = f", {note}" if note else ""
            what = f"to write {path} ({there}{need}{extra})"
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device {what}: free some space or point BASE_DIR at a "
            "bigger disk, then run the same command again (it resumes)",
        )
        self.path, self.needed = (None if path is None else Path(path)), needed

    def __str__(self) -> str:
        return self.strerror


# Below this much free space a failed write is taken for a full disk even when the error
# does not say so: torch.save reports ENOSPC as "basic_ios::clear: iostream error".
NEARLY_FULL_BYTES = 16 << 20
_FULL_TEXT = ("no space left on device", "disk quota exceeded")


def disk_full(
    exc: BaseException, path: Path | str | None = None, writing: bool = False
) -> DiskFullError | None:
    """The DiskFullError that ``exc`` amounts to, or None when it is some other failure.
    ``path``: the file being written; ``writing``: ``exc`` surely came from writing it (in
    ``atomic_path``), so a nearly full disk there explains an error that does not say."""
    if isinstance(exc, DiskFullError):
        return exc
    said = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(exc).lower() for text in _FULL_TEXT
    )
    if not said and writing and path is not None:
        free = free_bytes(Path(path).parent)
        said = free is not None and free < NEARLY_FULL_BYTES
    if not said:
        return None
    path = path or getattr(exc, "filename", None)
    return DiskFullError(path, note=None if path else one_line(exc))


def check_free_space(path: Path | str, needed: int) -> None:
    """Raise DiskFullError before writing ``needed`` bytes at ``path`` when they cannot fit
    (nothing is refused where the file system does not report its free space)."""
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        raise DiskFullError(path, needed)


TEMP_SUFFIX = ".tmp"  # atomic_path's temp files: .<final name>.<random>.tmp beside the final


def sweep_temp_files(folder: Path | str, of: str = "") -> list[Path]:
    """Remove the temp files ``atomic_path`` left in ``folder`` when a writer was killed
    (SIGKILL, power loss): they are never a complete artifact. ``of``: only those of this
    final name. Call it only where no other process may be writing that (e.g. under the run
    lock). The removed paths are returned."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".{of}*{TEMP_SUFFIX}" if of else f".*{TEMP_SUFFIX}"):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def lock_folder(
    folder: Path | str, busy: Callable[[Path], Exception] | None = None
) -> Iterator[None]:
    """An exclusive flock on ``<folder>/.lock`` (the folder is created) for the ``with`` block.

    When another process holds it: ``busy(lock_path)`` is raised at once when given; without
    ``busy``, a line says so and the call waits for its turn. The lock file is never deleted:
    removing it would let two processes lock two different inodes. The kernel drops the lock
    when the process dies, so it cannot go stale.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                raise busy(lock_path) from None
            log(f"waiting for another run to finish writing {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync it and rename it over ``final``.

    On any exception (Ctrl-C included) the temp file is removed, so a reader never sees
    a partial artifact under the final name and the previous version stays intact. A write
    that failed for want of space is raised as a DiskFullError naming ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent
        )
    except OSError as exc:
        raise (disk_full(exc, final, writing=True) or exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are shared (docker, volumes)
        os.replace(tmp, final)
    except BaseException as exc:
        # Judge "full" while the temp file still takes its space, then free it.
        full = (
            disk_full(exc, final, writing=True)
            if isinstance(exc, (OSError, RuntimeError))
            else None
        )
        tmp.unlink(missing_ok=True)
        if full is not None and full is not exc:
            raise full from None
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_repo_problem(text: str) -> str | None:
    """Why ``text`` is not a Hugging Face repository id (``owner/name``), or None."""
    if HUB_REPO_ID.match(text) and ".." not in text and len(text) <= 96:
        return None
    return f"expected a Hub repository like you/my-model, got {text!r}"
