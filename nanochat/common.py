"""Small helpers every stage shares: where artifacts live, atomic writes, one-line CLI errors.

Standard library only, so the orchestration layer (tasks.py, backends/) can import it on a
laptop without the training dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BASE_DIR_ENV = "NANOCHAT_BASE_DIR"
DEFAULT_BASE_DIR = Path("~/.cache/nanochat")


def base_dir() -> Path:
    """The artifacts root: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat (see README, Artifacts)."""
    return Path(os.environ.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR).expanduser()


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2, nothing touched."""


def die(message: str, code: int = 2) -> None:
    """Print one clear line to stderr and exit (2 = bad input, 1 = the work failed)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_main(main) -> None:
    """A stage script's entry point: exit with ``main()``'s code; a UsageError (bad input)
    becomes one ``error:`` line on stderr (from rank 0 only under torchrun) and exit 2."""
    try:
        code = main()
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    raise SystemExit(code)


def stamp(message: str) -> str:
    """``[HH:MM:SS] message``: the prefix of every progress line."""
    return f"[{time.strftime('%H:%M:%S')}] {message}"


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout is kept for results)."""
    print(stamp(message), file=sys.stderr, flush=True)


def one_line(exc: BaseException | str) -> str:
    """An exception (or text) squeezed onto one line of at most 400 characters."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 400 else text[:397] + "..."


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


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync it and rename it over ``final``.

    On any exception (Ctrl-C included) the temp file is removed, so a reader never sees
    a partial artifact under the final name and the previous version stays intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are shared (docker, volumes)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
