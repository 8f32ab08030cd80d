"""Stage 1: put pretraining text under ``BASE_DIR/base_data/<dataset>/`` as parquet shards.

Three kinds of data, one output format (``nanochat.shards``; the highest-numbered shard is
the validation split):

    # remote: shards 0..N-1 of a published dataset plus its validation shard, in parallel
    python -m nanochat.dataset --dataset climbmix --shards 8
    python -m nanochat.dataset --dataset fineweb-edu --shards 240 --workers 16
    # the same files from a mirror (same file names under that URL)
    python -m nanochat.dataset --dataset climbmix --shards 8 --source https://mirror.example/climbmix
    # your own documents: *.parquet (column text), *.jsonl (field text), *.txt (one per file)
    python -m nanochat.dataset --dataset mydocs --source /path/to/folder
    # the tiny offline corpus (stdlib docstrings; what the tiny preset uses)
    python -m nanochat.dataset --dataset embedded

Every shard is written to a temp file and checked with ``shards.verify_shard`` before it is
renamed into place, so a shard under its final name is always complete; shards already
present and valid are skipped, so re-running is cheap. One run per folder at a time
(``<folder>/.lock``). Exit codes: 0 done, 1 some shard failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nanochat import shards
from nanochat.common import (
    CliParser,
    atomic_path,
    atomic_write_text,
    base_dir,
    log,
    positive_int,
)

# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class RemoteDataset:
    repo: str  # Hugging Face dataset repo
    num_shards: int  # shard_00000 .. shard_<num_shards-1>; the last one is validation

    @property
    def validation_index(self) -> int:
        return self.num_shards - 1

    @property
    def base_url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}/resolve/main"


# DESIGN B.1: ClimbMix is the current recipe's data, FineWeb-EDU the original's.
REMOTE_DATASETS = {
    "climbmix": RemoteDataset("karpathy/climbmix-400b-shuffle", 6543),
    "fineweb-edu": RemoteDataset("karpathy/fineweb-edu-100b-shuffle", 1823),
}
EMBEDDED = "embedded"
DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

CHUNK_BYTES = 1 << 20
MAX_BACKOFF_S = 60.0
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
EMBEDDED_SHARD_CHARS = 1_000_000
VALIDATION_FRACTION = 0.10  # custom data that fits one shard: last 10% of documents
BUILDING_MARKER = ".building"  # present while a folder is being (re)built
MANIFEST = ".source.json"  # what a custom folder was converted from
USER_AGENT = "nanochat-dataset/0.1 (python-requests)"


def shard_indices(dataset: RemoteDataset, num_train: int) -> list[int]:
    """Training shards 0..num_train-1, then the validation shard (kept last by its index)."""
    return [*range(num_train), dataset.validation_index]


# ----------------------------------------------------------------------------- locking


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive, non-blocking flock on ``<folder>/.lock``; FolderBusy if already held.

    The lock file is never deleted: removing it would let two processes lock two different
    inodes. The kernel drops the lock when the process dies, so it cannot go stale.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"another nanochat.dataset run is writing {folder} (lock {lock_path} is held); "
                "wait for it to finish"
            ) from None
        _sweep_temp_files(folder)  # leftovers of a run killed hard (SIGKILL, power loss)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sweep_temp_files(folder: Path) -> None:
    for tmp in folder.glob(".shard_*.tmp"):
        tmp.unlink(missing_ok=True)


def _clear_shards(folder: Path) -> None:
    for path in shards.list_shards(folder):
        path.unlink()


def _folder_complete(folder: Path) -> bool:
    """At least two shards, all valid, and no interrupted build."""
    if (folder / BUILDING_MARKER).exists():
        return False
    found = shards.list_shards(folder)
    return len(found) >= 2 and all(shards.verify_shard(p) is None for p in found)


# ----------------------------------------------------------------------------- download


@dataclass
class DownloadSummary:
    fetched: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard index -> one-line reason
    bytes: int = 0  # size of the shards fetched
    seconds: float = 0.0


class _Retryable(Exception):
    """A failure worth another attempt (5xx, 408/429, short or invalid content)."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s  # the server's Retry-After, when it gave one


class _Fatal(Exception):
    """A failure another attempt will not fix (404 and the other 4xx)."""


class _Cancelled(Exception):
    pass


class Downloader:
    """Fetches shards in parallel threads; one requests.Session per thread (connection reuse)."""

    def __init__(
        self,
        base_url: str,
        folder: Path,
        *,
        workers: int = 8,
        retries: int = 5,
        retry_delay: float = 2.0,
        timeout: float = 60.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.folder = Path(folder)
        self.workers = workers
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self._bar = None  # the tqdm bar while one is up: progress lines go through it
        self.stop = threading.Event()
        self._local = threading.local()
        self._sessions: list = []
        self._lock = threading.Lock()
        self._bytes_seen = 0  # every byte received, failed attempts included (for the rate)
        self._random = random.Random()

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(_stamp(message), file=sys.stderr)
        else:
            log(message)

    def url(self, index: int) -> str:
        return f"{self.base_url}/{shards.shard_name(index)}"

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            session.headers["Accept-Encoding"] = "identity"  # so Content-Length = file size
            token = os.environ.get("HF_TOKEN")
            host = urlsplit(self.base_url).hostname or ""
            # The token goes to Hugging Face only, never to a mirror; requests drops it on
            # the redirect to the CDN host by itself.
            if token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
                session.headers["Authorization"] = f"Bearer {token}"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _attempt(self, index: int) -> int:
        """One GET into a temp file, verified, renamed into place. Returns the size."""
        url = self.url(index)
        final = self.folder / shards.shard_name(index)
        with atomic_path(final) as tmp:
            with self._session().get(url, stream=True, timeout=self.timeout) as response:
                status = response.status_code
                if status in RETRY_STATUS or status >= 500:
                    raise _Retryable(f"HTTP {status}", _retry_after(response))
                if status == 404:
                    raise _Fatal(f"not found (HTTP 404): {url}")
                if status in (401, 403):
                    raise _Fatal(f"access denied (HTTP {status}; set HF_TOKEN?): {url}")
                if status >= 400:
                    raise _Fatal(f"HTTP {status}: {url}")
                size = 0
                with open(tmp, "wb") as out:
                    for chunk in response.iter_content(CHUNK_BYTES):
                        if self.stop.is_set():
                            raise _Cancelled
                        out.write(chunk)
                        size += len(chunk)
                        with self._lock:
                            self._bytes_seen += len(chunk)
                expected = response.headers.get("Content-Length")
                if expected is not None and "Content-Encoding" not in response.headers:
                    if expected.isdigit() and int(expected) != size:
                        raise _Retryable(f"length mismatch: got {size} of {expected} bytes")
            reason = shards.verify_shard(tmp)
            if reason is not None:
                raise _Retryable(f"invalid content: {reason}")
        return size

    def fetch(self, index: int) -> tuple[int, str | None]:
        """(bytes written, None) on success, (0, reason) after the last failed attempt."""
        import requests

        transient = (
            requests.ConnectionError,  # refused, reset, dropped, DNS, SSL, read timeouts
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,  # body shorter than Content-Length
            requests.exceptions.ContentDecodingError,
            _Retryable,
        )
        for attempt in range(1, self.retries + 1):
            if self.stop.is_set():
                return 0, "cancelled"
            try:
                return self._attempt(index), None
            except _Fatal as exc:
                return 0, str(exc)
            except _Cancelled:
                return 0, "cancelled"
            except transient as exc:
                reason = _describe(exc)
                if attempt == self.retries:
                    return 0, f"{reason} (gave up after {attempt} attempts): {self.url(index)}"
                delay = self.retry_delay * 2 ** (attempt - 1) * self._random.uniform(1.0, 1.25)
                server_wait = getattr(exc, "wait_s", None)
                if server_wait is not None:
                    delay = max(delay, server_wait)
                delay = min(delay, MAX_BACKOFF_S)
                self.note(
                    f"{shards.shard_name(index)}: {reason}; "
                    f"retry {attempt + 1}/{self.retries} in {delay:.1f} s"
                )
                if self.stop.wait(delay):  # returns at once on Ctrl-C
                    return 0, "cancelled"
            except OSError as exc:  # after transient: requests' errors are OSErrors too
                return 0, f"cannot write {self.folder}: {_one_line(exc)}"
        raise AssertionError("unreachable")

    def run(self, indices: list[int]) -> DownloadSummary:
        """Skip valid shards, fetch the rest in parallel, report per shard."""
        from tqdm import tqdm

        summary = DownloadSummary()
        start = time.monotonic()
        todo = []
        for index in indices:
            path = self.folder / shards.shard_name(index)
            if path.exists():
                reason = shards.verify_shard(path)
                if reason is None:
                    summary.skipped.append(index)
                    continue
                self.note(f"{path.name} is present but invalid ({reason}); fetching it again")
            todo.append(index)
        if summary.skipped:
            self.note(f"{len(summary.skipped)} shard(s) already present and valid: skipped")
        if not todo:
            summary.seconds = time.monotonic() - start
            return summary

        bar = self._bar = tqdm(total=len(todo), unit="shard", file=sys.stderr, mininterval=0.5)
        pending: set = set()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="shard") as pool:
                futures = {pool.submit(self.fetch, index): index for index in todo}
                pending = set(futures)
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                        for future in done:
                            index = futures[future]
                            size, error = future.result()
                            if error is None:
                                summary.fetched.append(index)
                                summary.bytes += size
                            else:
                                summary.failed[index] = error
                            bar.update(1)
                        elapsed = max(time.monotonic() - start, 1e-9)
                        megabytes = self._bytes_seen / 1e6
                        bar.set_postfix_str(
                            f"{megabytes:.1f} MB, {megabytes / elapsed:.1f} MB/s", refresh=False
                        )
                except BaseException:
                    # Ctrl-C: workers see the flag within one chunk (or one --timeout when
                    # stalled); their temp files are removed as they unwind.
                    self.stop.set()
                    for future in pending:
                        future.cancel()
                    self.note("stopping the downloads in flight")
                    raise
        finally:
            bar.close()
            self._bar = None
            for session in self._sessions:
                session.close()
        summary.fetched.sort()
        summary.seconds = time.monotonic() - start
        return summary


def _retry_after(response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _describe(exc: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, without pool and object reprs:
    "Failed to resolve 'huggingface.co' (...)" rather than three nested wrappers."""
    root = exc
    for _ in range(8):
        inner = getattr(root, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in root.args if isinstance(a, BaseException)), None)
        if inner is None:
            break
        root = inner
    text = root.args[0] if root.args and isinstance(root.args[0], str) else str(root)
    text = re.sub(r"^\w+\(host=[^)]*\): ", "", text)
    text = re.sub(r"<[^>]* object at 0x[0-9a-f]+>:? ?", "", text)
    return _one_line(text or root.__class__.__name__)


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _stamp(message: str) -> str:
    return f"[{time.strftime('%H:%M:%S')}] {message}"


# ----------------------------------------------------------------------------- embedded


def ensure_embedded(base: Path) -> Path:
    """The embedded corpus folder under ``base``, built if it does not already hold a
    complete set (>= 2 valid shards, no interrupted build). Raises FolderBusy if another
    process is building it."""
    folder = shards.data_dir(base, EMBEDDED)
    if _folder_complete(folder):
        return folder
    with folder_lock(folder):
        if not _folder_complete(folder):  # someone may have finished it while we waited
            _build_embedded(folder)
    return folder


def _build_embedded(folder: Path) -> None:
    from nanochat import embedded_corpus

    start = time.monotonic()
    train, val = embedded_corpus.split_corpus(embedded_corpus.build_corpus())
    groups = _pack(train, EMBEDDED_SHARD_CHARS) + [val]
    with _building(folder):
        for index, texts in enumerate(groups):
            shards.write_shard(folder / shards.shard_name(index), texts)
    chars = sum(map(len, train)) + sum(map(len, val))
    log(
        f"embedded corpus: {len(train) + len(val)} documents, {chars / 1e6:.2f} M chars, "
        f"{len(groups)} shards ({len(val)} validation documents) in "
        f"{time.monotonic() - start:.1f} s"
    )


def _pack(texts: list[str], shard_chars: int) -> list[list[str]]:
    """Consecutive groups of about shard_chars characters each."""
    groups: list[list[str]] = [[]]
    size = 0
    for text in texts:
        if groups[-1] and size >= shard_chars:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += len(text)
    return groups if groups[-1] else groups[:-1]


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Mark the folder as being rebuilt (old shards cleared); the mark goes only on success,
    so an interrupted build is never taken for a complete one."""
    marker = folder / BUILDING_MARKER
    marker.touch()
    _clear_shards(folder)
    yield
    marker.unlink()


# ----------------------------------------------------------------------------- custom folder

SOURCE_SUFFIXES = (".parquet", ".jsonl", ".txt")


class InputError(ValueError):
    """A source file that cannot be read as documents (one line, names the file)."""


def source_files(source: Path) -> list[Path]:
    """*.parquet, *.jsonl, *.txt under source, recursively, in sorted relative-path order
    (hidden files and folders skipped)."""
    found = []
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if path.suffix in SOURCE_SUFFIXES and path.is_file():
            if not any(part.startswith(".") for part in rel.parts):
                found.append(rel)
    return [source / rel for rel in sorted(found, key=lambda r: r.as_posix())]


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Every non-empty document of the files, in order."""
    for path in files:
        for text in _file_documents(path):
            if text and text.strip():
                yield text


def _file_documents(path: Path) -> Iterator[str | None]:
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}:{number}: invalid JSON ({exc})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise InputError(f"{path}:{number}: no string field 'text'")
                yield text
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(path).schema_arrow
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise InputError(f"{path}: not a readable parquet file ({_one_line(exc)})") from None
        if "text" not in schema.names or not (
            pa.types.is_string(schema.field("text").type)
            or pa.types.is_large_string(schema.field("text").type)
        ):
            raise InputError(f"{path}: needs a string column 'text'")
        yield from shards.iter_texts([path])


def _fingerprint(files: list[Path], source: Path, shard_chars: int) -> dict:
    return {
        "source": str(source),
        "shard_chars": shard_chars,
        "files": [
            [p.relative_to(source).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files
        ],
    }


def convert_folder(source: Path, folder: Path, shard_chars: int) -> tuple[int, int, int]:
    """Convert a folder of documents into shards under ``folder`` (the caller holds its lock).

    Shards of ``shard_chars`` characters; the last shard is validation. If everything fits
    one shard, the last ~10% of documents (at least one) become the validation shard.
    Returns (documents, characters, shards); (0, 0, n) means "already up to date".
    Raises InputError for unreadable input or fewer than two documents.
    """
    source = Path(source).resolve()
    files = source_files(source)
    if not files:
        raise InputError(f"{source} holds no *.parquet, *.jsonl or *.txt files")
    fingerprint = _fingerprint(files, source, shard_chars)
    manifest = folder / MANIFEST
    if _folder_complete(folder) and _read_json(manifest) == fingerprint:
        return 0, 0, len(shards.list_shards(folder))

    manifest.unlink(missing_ok=True)
    documents = chars = 0
    written = 0
    with _building(folder):
        pending: list[str] = []
        size = 0
        for text in iter_documents(files):
            pending.append(text)
            size += len(text)
            documents += 1
            chars += len(text)
            if size >= shard_chars:
                shards.write_shard(folder / shards.shard_name(written), pending)
                written += 1
                pending, size = [], 0
        if documents < 2:
            raise InputError(
                f"{source} holds {documents} usable document(s); need at least 2 "
                "(training + validation)"
            )
        if written == 0 or (written == 1 and not pending):
            # Everything fits one shard: split its documents into train / validation.
            if not pending:
                pending = list(shards.iter_texts([folder / shards.shard_name(0)]))
            n_val = min(max(1, round(len(pending) * VALIDATION_FRACTION)), len(pending) - 1)
            shards.write_shard(folder / shards.shard_name(0), pending[:-n_val])
            shards.write_shard(folder / shards.shard_name(1), pending[-n_val:])
            written = 2
        elif pending:
            shards.write_shard(folder / shards.shard_name(written), pending)
            written += 1
        # else: the last full shard written is the validation shard
    atomic_write_text(manifest, json.dumps(fingerprint, indent=1) + "\n")
    return documents, chars, written


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- CLI


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m nanochat.dataset",
        description="Stage 1: download (or build) pretraining shards under "
        "$NANOCHAT_BASE_DIR/base_data/<dataset>/.",
    )
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        metavar="NAME",
        default="climbmix",
        help="climbmix | fineweb-edu (remote), embedded (offline stdlib corpus), or any name "
        "[a-z0-9][a-z0-9_-]* for a --source folder (default: climbmix)",
    )
    group.add_argument(
        "--shards",
        metavar="N",
        type=positive_int,
        default=8,
        help="number of TRAINING shards to download, shards 0..N-1 of a remote dataset; "
        "the validation shard is always added (default: 8; ignored for embedded/folder data)",
    )
    group.add_argument(
        "--source",
        default=None,
        metavar="URL_OR_DIR",
        help="http(s) URL of a mirror holding the same shard_NNNNN.parquet files, or a local "
        "folder of *.parquet/*.jsonl/*.txt documents to convert (default: none = Hugging Face)",
    )
    group.add_argument(
        "--shard-chars",
        metavar="CHARS",
        type=positive_int,
        default=250_000_000,
        help="characters per shard when converting a --source folder (default: 250000000, "
        "about 100 MB of parquet)",
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=8,
        help="parallel downloads (threads) (default: 8)",
    )
    net.add_argument(
        "--retries",
        metavar="N",
        type=positive_int,
        default=5,
        help="attempts per shard, the first included; 1 = no retry (default: 5)",
    )
    net.add_argument(
        "--retry-delay",
        type=_non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="backoff base in seconds: attempt k waits about SECONDS * 2^(k-1), plus up to "
        "25%% jitter, at most 60 s (default: 2.0)",
    )
    net.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="connect and read timeout per request, in seconds (default: 60)",
    )
    return parser


def _source_kind(source: str | None) -> str:
    if source is None:
        return "none"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        return "url"
    return "folder"


def _validate(parser: CliParser, args: argparse.Namespace) -> None:
    """Every usage error, before any disk or network work."""
    name, kind = args.dataset, _source_kind(args.source)
    if not DATASET_NAME.match(name):
        parser.error(f"--dataset {name!r}: use lowercase letters, digits, '-' and '_'")
    if kind == "url" and urlsplit(args.source).scheme not in ("http", "https"):
        parser.error(f"--source {args.source!r}: only http(s) URLs or local folders")
    if name == EMBEDDED:
        if kind != "none":
            parser.error("--dataset embedded is built offline; it takes no --source")
        return
    remote = REMOTE_DATASETS.get(name)
    if kind == "folder":
        if remote is not None:
            parser.error(
                f"--dataset {name} is a remote dataset; name your folder's data "
                "(e.g. --dataset mydocs --source FOLDER)"
            )
        source = Path(args.source).expanduser()
        if not source.is_dir():
            parser.error(f"--source folder {args.source!r} does not exist")
        out = shards.data_dir(base_dir(), name).resolve()
        src = source.resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            parser.error(f"--source {src} overlaps the output folder {out}")
        return
    if remote is None:
        known = ", ".join([*REMOTE_DATASETS, EMBEDDED])
        parser.error(f"unknown --dataset {name!r} (known: {known}; or give --source FOLDER)")
    if args.shards > remote.num_shards - 1:
        parser.error(f"--shards {args.shards}: {name} has {remote.num_shards - 1} training shards")


def main(argv: list[str] | None = None) -> int:
    """Run stage 1 and return its exit code; usage errors exit 2 (SystemExit) before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    base = base_dir()
    folder = shards.data_dir(base, args.dataset)
    previous = _sigterm_as_interrupt()
    try:
        if args.dataset == EMBEDDED:
            ensure_embedded(base)
            found = shards.list_shards(folder)
            megabytes = sum(p.stat().st_size for p in found) / 1e6
            print(f"embedded: {len(found)} shards ({megabytes:.1f} MB of parquet) in {folder}")
            return 0
        if _source_kind(args.source) == "folder":
            return _run_convert(args, folder)
        return _run_download(args, folder)
    except FolderBusy as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:
        log("interrupted; no partial shard was left under a final name")
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_download(args: argparse.Namespace, folder: Path) -> int:
    dataset = REMOTE_DATASETS[args.dataset]
    indices = shard_indices(dataset, args.shards)
    base_url = args.source or dataset.base_url
    with folder_lock(folder):
        downloader = Downloader(
            base_url,
            folder,
            workers=args.workers,
            retries=args.retries,
            retry_delay=args.retry_delay,
            timeout=args.timeout,
        )
        summary = downloader.run(indices)
    if summary.failed:
        for index, reason in sorted(summary.failed.items()):
            print(f"error: shard {index} ({shards.shard_name(index)}): {reason}", file=sys.stderr)
        print(
            f"error: {len(summary.failed)} of {len(indices)} shard(s) failed; "
            "re-run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(
        f"{args.dataset}: {len(summary.fetched)} shard(s) fetched, "
        f"{len(summary.skipped)} skipped, {summary.bytes / 1e6:.1f} MB in "
        f"{summary.seconds:.1f} s -> {folder}"
    )
    return 0


def _run_convert(args: argparse.Namespace, folder: Path) -> int:
    start = time.monotonic()
    source = Path(args.source).expanduser()
    try:
        with folder_lock(folder):
            documents, chars, count = convert_folder(source, folder, args.shard_chars)
    except (InputError, OSError) as exc:  # unreadable input, disk full: one line, not a trace
        print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    if documents == 0:
        print(f"{args.dataset}: {count} shards already converted from {source} -> {folder}")
    else:
        print(
            f"{args.dataset}: {documents} documents, {chars / 1e6:.1f} M chars -> {count} "
            f"shards (last = validation) in {time.monotonic() - start:.1f} s -> {folder}"
        )
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C."""


def _sigterm_as_interrupt():
    """docker stop / the local backend send SIGTERM: clean up like Ctrl-C (temp files go)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    raise SystemExit(main())
