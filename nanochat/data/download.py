"""The pipeline's HTTP downloader: fetch files in parallel, verified, atomically, with retries.

``Downloader(base_url, folder).run(indices, listing_url)`` GETs ``<base_url>/shard_NNNNN.parquet``
for each index (stage 1, ``nanochat.data.dataset``); ``run_jobs(jobs)`` fetches any list of
``Job(url, path, verify)`` (the chat task data, ``scripts.task_data``), ``fetch_one(job)`` a single
one in the caller's thread (the CORE eval bundle, ``nanochat.evaluation.bundle_fetch``), and
``get_json(url)`` reads a small JSON document (a file listing) under the same retry rules. Each
body goes to a temp file while its sha256 is computed; it must match the size and sha256 the job
expects (for shards: the hub's listing, when there is one), pass the job's ``verify``
(``shards.verify_shard`` decodes every row group) and only then is renamed into place. Transient
failures (5xx, 408/429, dropped connections, short, invalid or mismatching bodies) are retried with
jittered exponential backoff. Shards already present are checked against the folder's records
(``shards.read_records``) and skipped when they match; damaged ones are fetched again. The caller
holds the folder lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.common import atomic_path, log, one_line, stamp
from nanochat.data import shards

CHUNK_BYTES = 1 << 20
LISTING_BATCH = 200  # file names per paths-info request (a conservative batch)
SAVE_RECORDS_S = 5.0  # how often records are saved while shards land (and always at the end)
MAX_BACKOFF_S = 60.0
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
USER_AGENT = "nanochat-dataset/0.1 (python-requests)"


@dataclass(frozen=True)
class Job:
    """One file to fetch: GET ``url`` into ``path``, accepted when ``verify(path)`` is None
    (otherwise it returns a short reason) and the body has the ``size`` and ``sha256`` given
    (None: not known). ``key`` names the job in the summary (a shard index, a relative
    path); ``label`` names it in progress lines (default: the file name)."""

    url: str
    path: Path
    key: object
    verify: Callable[[Path], str | None] = shards.verify_shard
    label: str = ""
    size: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.path.name


@dataclass
class DownloadSummary:
    fetched: list = field(default_factory=list)  # job keys (shard indices for run())
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # job key -> one-line reason
    damaged: list = field(default_factory=list)  # keys of files present but damaged (re-fetched)
    bytes: int = 0  # size of the files fetched
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
    """Fetches files in parallel threads; one requests.Session per thread (connection reuse).

    ``base_url`` is where shards live (``run``/``url``) and decides whether HF_TOKEN is sent:
    only when it is a huggingface.co address."""

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
            self._bar.write(stamp(message), file=sys.stderr)
        else:
            log(message)

    def shard_job(self, index: int) -> Job:
        name = shards.shard_name(index)
        return Job(f"{self.base_url}/{name}", self.folder / name, index)

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

    def _attempt(self, job: Job) -> tuple[int, str]:
        """One GET into a temp file, checked, renamed into place. Returns (size, sha256)."""
        with atomic_path(job.path) as tmp:
            digest = hashlib.sha256()  # hashed as it streams: no second read of the file
            with self._session().get(job.url, stream=True, timeout=self.timeout) as response:
                _check_status(response, job.url)
                size = 0
                with open(tmp, "wb") as out:
                    for chunk in response.iter_content(CHUNK_BYTES):
                        if self.stop.is_set():
                            raise _Cancelled
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        with self._lock:
                            self._bytes_seen += len(chunk)
                expected = response.headers.get("Content-Length")
                if expected is not None and "Content-Encoding" not in response.headers:
                    if expected.isdigit() and int(expected) != size:
                        raise _Retryable(f"length mismatch: got {size} of {expected} bytes")
            sha256 = digest.hexdigest()
            if job.size is not None and size != job.size:
                raise _Retryable(f"size mismatch with the listing: got {size}, listed {job.size}")
            if job.sha256 is not None and sha256 != job.sha256:
                raise _Retryable(
                    f"sha256 mismatch with the listing: got {sha256[:12]}..., "
                    f"listed {job.sha256[:12]}... (damaged in transit or by the server)"
                )
            reason = job.verify(tmp)
            if reason is not None:
                raise _Retryable(f"invalid content: {reason}")
        return size, sha256

    def _attempt_json(self, url: str, form: dict | None = None):
        session = self._session()
        if form is None:
            request = session.get(url, timeout=self.timeout)
        else:
            request = session.post(url, data=form, timeout=self.timeout)
        with request as response:
            _check_status(response, url)
            body = response.content
        try:
            return json.loads(body)
        except ValueError as exc:  # a proxy's HTML error page, a cut-off body
            raise _Retryable(f"invalid JSON ({one_line(exc)})") from None

    def fetch(self, job: Job) -> tuple[tuple[int, str] | None, str | None]:
        """((bytes written, sha256), None) on success, (None, reason) after the last failed
        attempt."""
        return self._retrying(job.name, job.url, lambda: self._attempt(job))

    def get_json(
        self, url: str, label: str = "", form: dict | None = None
    ) -> tuple[object, str | None]:
        """(parsed JSON, None), or (None, reason) after the last failed attempt; the same
        retry rules as the files. For small documents (a listing), read in one piece; with
        ``form``, POSTed as form fields (the hub's paths-info API)."""
        return self._retrying(label or url, url, lambda: self._attempt_json(url, form))

    def _retrying(self, label: str, url: str, once: Callable[[], object]):
        """``once()`` until it succeeds, a fatal error, the last attempt or Ctrl-C:
        (its result, None) or (None, one-line reason)."""
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
                return None, "cancelled"
            try:
                return once(), None
            except _Fatal as exc:
                return None, str(exc)
            except _Cancelled:
                return None, "cancelled"
            except transient as exc:
                reason = describe_error(exc)
                if attempt == self.retries:
                    return None, f"{reason} (gave up after {attempt} attempts): {url}"
                delay = self.retry_delay * 2 ** (attempt - 1) * self._random.uniform(1.0, 1.25)
                server_wait = getattr(exc, "wait_s", None)
                if server_wait is not None:
                    delay = max(delay, server_wait)
                delay = min(delay, MAX_BACKOFF_S)
                self.note(f"{label}: {reason}; retry {attempt + 1}/{self.retries} in {delay:.1f} s")
                if self.stop.wait(delay):  # returns at once on Ctrl-C
                    return None, "cancelled"
            except requests.RequestException as exc:  # a bad URL, too many redirects
                return None, f"{describe_error(exc)}: {url}"
            except OSError as exc:  # after requests' errors, which are OSErrors too
                return None, f"cannot write {self.folder}: {one_line(exc)}"
        raise AssertionError("unreachable")

    def run(self, indices: list[int], listing_url: str | None = None) -> DownloadSummary:
        """Shards (keys = indices): those present and matching their record are skipped,
        the rest fetched in parallel; every shard accepted is recorded (size, sha256).
        ``listing_url``: the hub's paths-info API, whose sizes and sha256s the fetched
        bodies must match (None for a plain mirror)."""
        records = shards.read_records(self.folder)
        saved = dict(records)
        summary = DownloadSummary()
        start = time.monotonic()
        todo, adopted = [], 0
        jobs = [self.shard_job(index) for index in indices]
        for job, (reason, record) in zip(jobs, self._check_present(jobs, records), strict=True):
            if reason is None and job.path.exists():
                summary.skipped.append(job.key)
                if record is not None:
                    records[job.path.name] = record
                    adopted += 1
                continue
            if reason is not None:
                self.note(f"{job.name} is present but invalid ({reason}); fetching it again")
                summary.damaged.append(job.key)
                # Its record stays until the replacement lands: if the fetch fails, the
                # damaged file is still known as damaged (never adopted as an old shard).
            todo.append(job)
        if summary.skipped:
            self.note(
                f"{len(summary.skipped)} shard(s) already present and valid: skipped "
                f"(checked in {time.monotonic() - start:.1f} s)"
            )
        if adopted:
            self.note(f"recorded the sha256 of {adopted} shard(s) fetched by an older version")

        def save() -> None:
            nonlocal saved, last_save
            kept = {name: rec for name, rec in records.items() if (self.folder / name).exists()}
            if kept != saved:  # a shard deleted by hand takes its record with it
                shards.save_records(self.folder, kept)
                saved = kept
            last_save = time.monotonic()

        def landed(job: Job, size: int, sha256: str) -> None:
            records[job.path.name] = {"bytes": size, "sha256": sha256}
            if time.monotonic() - last_save >= SAVE_RECORDS_S:
                save()

        last_save = 0.0
        save()
        if todo and listing_url:
            listed = self.listing(listing_url, [job.path.name for job in todo])
            todo = [
                dataclasses.replace(job, size=size, sha256=sha256)
                for job in todo
                for size, sha256 in [listed.get(job.path.name, (None, None))]
            ]
        try:
            self._fetch_all(todo, summary, "shard", landed)
        finally:  # Ctrl-C included: the shards that landed keep their records
            save()
        summary.fetched.sort()
        summary.seconds = time.monotonic() - start
        return summary

    def _check_present(self, jobs: list[Job], records: dict) -> list[tuple]:
        """Per job: (why it is damaged or None, a new record or None), in parallel threads
        (hashlib and pyarrow release the GIL). A recorded shard is checked by size and
        sha256; one without a record (an older version fetched it) by decoding it whole."""

        def check(job: Job) -> tuple:
            if not job.path.exists():
                return None, None
            return shards.check_shard(job.path, records.get(job.path.name), job.verify)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="check") as pool:
            return list(pool.map(check, jobs))

    def listing(self, url: str, names: list[str]) -> dict[str, tuple[int | None, str | None]]:
        """File name -> (size, sha256) from the hub's paths-info API; {} (with a note) when
        it cannot be read: the shards are then checked by decoding only."""
        listed: dict[str, tuple[int | None, str | None]] = {}
        for start in range(0, len(names), LISTING_BATCH):
            form = {"paths": names[start : start + LISTING_BATCH]}
            data, error = self.get_json(url, "listing", form)
            if error is None:
                try:
                    listed.update(parse_listing(data))
                except ValueError as exc:
                    error = str(exc)
            if error is not None:
                self.note(f"cannot read the hub's listing ({error}); checking by decoding only")
                return {}
        return listed

    def run_jobs(self, jobs: list[Job], unit: str = "file") -> DownloadSummary:
        """Skip files present and valid, fetch the rest in parallel with a progress bar."""
        summary = DownloadSummary()
        start = time.monotonic()
        todo = []
        for job in jobs:
            if job.path.exists():
                reason = job.verify(job.path)
                if reason is None:
                    summary.skipped.append(job.key)
                    continue
                self.note(f"{job.name} is present but invalid ({reason}); fetching it again")
            todo.append(job)
        if summary.skipped:
            self.note(f"{len(summary.skipped)} {unit}(s) already present and valid: skipped")
        self._fetch_all(todo, summary, unit)
        summary.seconds = time.monotonic() - start
        return summary

    def _fetch_all(
        self,
        todo: list[Job],
        summary: DownloadSummary,
        unit: str,
        landed: Callable[[Job, int, str], None] | None = None,
    ) -> None:
        """Fetch the jobs in parallel with a progress bar, into ``summary``; ``landed`` is
        called (in this thread) for each file that got its final name."""
        from tqdm import tqdm

        if not todo:
            return
        start = time.monotonic()
        bar = self._bar = tqdm(total=len(todo), unit=unit, file=sys.stderr, mininterval=0.5)
        pending: set = set()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="download") as pool:
                futures = {pool.submit(self.fetch, job): job for job in todo}
                pending = set(futures)
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                        for future in done:
                            job = futures[future]
                            result, error = future.result()
                            if error is None:
                                summary.fetched.append(job.key)
                                summary.bytes += result[0]
                                if landed is not None:
                                    landed(job, *result)
                            else:
                                summary.failed[job.key] = error
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
            self.close()

    def close(self) -> None:
        """Close every thread's session (a later request opens a new one)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for session in sessions:
            session.close()


def fetch_one(job: Job, **options) -> tuple[tuple[int, str] | None, str | None]:
    """One file, in this thread, under ``Downloader.fetch``'s rules (retries with backoff,
    checks, atomic rename): ((bytes written, sha256), None), or (None, one-line reason).
    ``options``: the Downloader's retries, retry_delay and timeout."""
    downloader = Downloader(job.url, job.path.parent, workers=1, **options)
    try:
        return downloader.fetch(job)
    finally:
        downloader.close()


def _check_status(response, url: str) -> None:
    """Raise _Retryable for 5xx/408/429, _Fatal for the other 4xx; return on success."""
    status = response.status_code
    if status in RETRY_STATUS or status >= 500:
        raise _Retryable(f"HTTP {status}", retry_after(response))
    if status == 404:
        raise _Fatal(f"not found (HTTP 404): {url}")
    if status in (401, 403):
        # The hub wants a token for gated data; S3 answers 403 for a missing file too.
        hint = "; set HF_TOKEN?" if "huggingface.co" in url else ""
        raise _Fatal(f"access denied (HTTP {status}{hint}): {url}")
    if status >= 400:
        raise _Fatal(f"HTTP {status}: {url}")


def parse_listing(data: object) -> dict[str, tuple[int | None, str | None]]:
    """File path -> (size, sha256) from a paths-info (or tree) answer: a list of entries
    ``{"type": "file", "path", "size", "lfs": {"oid": <sha256>, "size"}}``. Only an LFS
    entry carries a sha256 of the content (a plain entry's ``oid`` is a git blob id)."""
    if not isinstance(data, list):
        raise ValueError(f"the listing is a {type(data).__name__}, not a list of files")
    listed = {}
    for entry in data:
        if not isinstance(entry, dict) or entry.get("type") != "file":
            continue
        path = entry.get("path")
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
        size = lfs.get("size", entry.get("size"))
        sha256 = lfs.get("sha256", lfs.get("oid"))
        if isinstance(sha256, str):
            sha256 = sha256.removeprefix("sha256:").lower()
        if not isinstance(path, str):
            continue
        listed[path] = (
            size if type(size) is int and size >= 0 else None,
            sha256 if isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256) else None,
        )
    return listed


def retry_after(response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def describe_error(exc: BaseException) -> str:
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
    return one_line(text or root.__class__.__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C."""


HUB = "https://huggingface.co"


def hub_endpoint() -> str:
    """The Hugging Face hub, or the mirror $HF_ENDPOINT names (shards and task data alike)."""
    return (os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")


@contextlib.contextmanager
def interruptible(what: str) -> Iterator[None]:
    """A fetch that Ctrl-C or SIGTERM (docker stop, the local backend) stops cleanly: temp
    files go, one line says so, and the process exits 130 (Ctrl-C) or 143 (SIGTERM)."""
    previous = sigterm_as_interrupt()
    try:
        yield
    except KeyboardInterrupt as exc:
        log(f"interrupted; no partial {what} was left under a final name")
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def sigterm_as_interrupt():
    """docker stop / the local backend send SIGTERM: clean up like Ctrl-C (temp files go).
    Returns the previous handler to restore (None off the main thread, where it cannot be
    set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated

    return signal.signal(signal.SIGTERM, handler)


def add_network_arguments(parser, unit: str) -> None:
    """The "network" flags of every command that downloads with this module (``unit``:
    what one request fetches, for the help text): --workers, --retries, --retry-delay and
    --timeout, matching ``Downloader``'s keyword arguments."""
    from nanochat.common import non_negative_float, positive_float, positive_int

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
        help=f"attempts per {unit}, the first included; 1 = no retry (default: 5)",
    )
    net.add_argument(
        "--retry-delay",
        type=non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="backoff base in seconds: attempt k waits about SECONDS * 2^(k-1), plus up to "
        "25%% jitter, at most 60 s (default: 2.0)",
    )
    net.add_argument(
        "--timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="connect and read timeout per request, in seconds (default: 60)",
    )
