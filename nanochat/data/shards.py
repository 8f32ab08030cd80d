"""The on-disk format of pretraining text: parquet shards with one string column ``text``.

``base_data/<dataset>/shard_NNNNN.parquet``, zstd, row groups of 1024 documents.
The highest-numbered shard of a folder is the validation split; all others are training.
Stage 1 (``nanochat.data.dataset``) writes shards with this module; the tokenizer and the data
loader read them with it.

Integrity: a shard gets its final name only after every row group decoded
(``verify_shard``); its size and sha256 then go into the folder's record file
(``.shards.json``). Stage 1 re-checks every shard against its record on each run and
fetches (or rebuilds) the damaged ones. Readers check every shard's size when they start (one
stat each) and a shard's sha256 the first time a process opens it (about 0.1 s per 100 MB
shard, docs/benchmarks.md); a damaged shard is a ``ShardError``, one line naming the file and
the fix. Shards from before the records existed are decoded once by stage 1 and recorded.

The folder section is stage 1's guard for a folder being written: one writer at a time
(``<folder>/.lock``) and a ``.building`` marker while it is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.common import (
    ArtifactError,
    UsageError,
    atomic_path,
    atomic_write_text,
    file_sha256,
    lock_folder,
    log,
    one_line,
    sweep_temp_files,
)

ROW_GROUP_SIZE = 1024
SHARD_PATTERN = re.compile(r"^shard_(\d{5})\.parquet$")
RECORDS_FILE = ".shards.json"  # per folder: size and sha256 of every accepted shard
RECORDS_FORMAT = 1
FIX = "run `make download` again: it re-fetches damaged shards (or rebuilds converted ones)"


class ShardError(ArtifactError):
    """A shard that cannot be used; the message names the file, what is wrong and the fix."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir(base: Path, dataset: str) -> Path:
    """Where a dataset's shards live under the artifacts root."""
    return Path(base) / "base_data" / dataset


def list_shards(directory: Path) -> list[Path]:
    """Shards of a folder in index order (temp files and other names ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if SHARD_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(SHARD_PATTERN.match(p.name).group(1)))


def split_shards(directory: Path) -> tuple[list[Path], Path]:
    """(training shards, validation shard): the last shard is validation.

    Raises FileNotFoundError with a one-line reason when there are fewer than two shards.
    """
    shards = list_shards(directory)
    if len(shards) < 2:
        raise FileNotFoundError(
            f"{directory} holds {len(shards)} shard(s); need at least 2 (train + validation)"
        )
    return shards[:-1], shards[-1]


def damaged(path: Path, what: str) -> ShardError:
    """The one-line error for a file that fails a check; a shard's says how to repair it
    (a user's own source file, read by the conversion, has no such fix)."""
    fix = f"; {FIX}" if SHARD_PATTERN.match(Path(path).name) else ""
    return ShardError(f"{path} {what}{fix}")


# ----------------------------------------------------------------------------- content


def verify_shard(path: Path) -> str | None:
    """None when the file is a shard whose every row group decodes (a string ``text``
    column, at least one row); otherwise a short reason. Reads the whole file: done once,
    before a shard gets its final name, because parquet's footer can be intact while a data
    page is not (a flipped byte shows up only as a ZSTD error when that page is read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            schema = pf.schema_arrow
            if "text" not in schema.names:
                return f"no 'text' column (columns: {', '.join(schema.names)})"
            text_type = schema.field("text").type
            if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
                return f"column 'text' has type {text_type}, expected string"
            if pf.metadata.num_rows == 0:
                return "no rows"
            for rg in range(pf.num_row_groups):
                try:
                    table = pf.read_row_group(rg, columns=["text"])
                    table.validate(full=True)  # offsets and UTF-8, which reading skips
                    rows = table.num_rows
                except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ...
                    return f"row group {rg} does not decode ({_describe(exc)})"
                if rows != pf.metadata.row_group(rg).num_rows:
                    return f"row group {rg} decodes to {rows} rows, its footer says otherwise"
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        return f"not a readable parquet file ({_describe(exc)})"
    return None


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {one_line(exc)}"


def write_shard(path: Path, texts: Iterable[str], row_group_size: int = ROW_GROUP_SIZE) -> int:
    """Write documents as one shard, atomically: decoded back before it gets its final name,
    then recorded in the folder's record file. Returns the number of documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    texts = list(texts)
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        reason = verify_shard(tmp)
        if reason is not None:  # the disk gave back something else than was written
            raise ShardError(f"{path} was written but does not read back ({reason})")
        size, digest = tmp.stat().st_size, file_sha256(tmp)
    add_record(path, size, digest)
    return len(texts)


# ----------------------------------------------------------------------------- records


def read_records(folder: Path) -> dict[str, dict]:
    """Shard name -> {"bytes", "sha256"} from the folder's record file; {} when there is none.
    An unreadable record file counts as none: every shard is then decoded and recorded again
    by the next stage-1 run, so nothing is trusted on its word."""
    path = Path(folder) / RECORDS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _note_once(path, f"{path} is unreadable ({one_line(exc)}); its shards count as unrecorded")
        return {}
    found = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(found, dict):
        _note_once(path, f"{path} holds no shard records; its shards count as unrecorded")
        return {}
    return {name: rec for name, rec in found.items() if _is_record(rec)}


def _is_record(rec: object) -> bool:
    return (
        isinstance(rec, dict)
        and type(rec.get("bytes")) is int
        and isinstance(rec.get("sha256"), str)
        and len(rec["sha256"]) == 64
    )


def save_records(folder: Path, records: dict[str, dict]) -> None:
    """Write the record file atomically (the caller holds the folder lock)."""
    body = {"format": RECORDS_FORMAT, "shards": dict(sorted(records.items()))}
    atomic_write_text(Path(folder) / RECORDS_FILE, json.dumps(body, indent=1) + "\n")


def add_record(path: Path, size: int, sha256: str) -> None:
    records = read_records(path.parent)
    records[path.name] = {"bytes": size, "sha256": sha256}
    save_records(path.parent, records)


def check_recorded(path: Path, record: dict, full: bool = True) -> str | None:
    """None when the shard has its recorded size (and, when ``full``, its sha256)."""
    size = Path(path).stat().st_size
    if size != record["bytes"]:
        return f"has {size} bytes, {record['bytes']} recorded (truncated or replaced)"
    if full and file_sha256(path) != record["sha256"]:
        return "does not match its recorded sha256 (damaged)"
    return None


# ----------------------------------------------------------------------------- reading

# Shards whose sha256 matched their record in this process, by path, with the (inode, size,
# mtime) they had then: a second loader (validation, a new epoch) does not hash them again.
_hashed: dict[str, tuple[int, int, int]] = {}
_noted: set[Path] = set()  # folders and record files already mentioned in a note


def _note_once(key: Path, message: str) -> None:
    if key not in _noted:
        _noted.add(key)
        log(f"note: {message}")


def _note_unrecorded(folder: Path) -> None:
    _note_once(
        folder,
        f"some shards in {folder} have no recorded sha256 yet (still being downloaded, or "
        "fetched by an older nanochat): they are checked as they decode, and recorded when "
        "`make download` completes",
    )


def check_sizes(paths: Iterable[Path]) -> None:
    """A reader's start: every shard is there with its recorded size (one stat each, no
    reading). Raises ShardError for the first one that is not."""
    records: dict[Path, dict] = {}
    for path in map(Path, paths):
        if path.parent not in records:
            records[path.parent] = read_records(path.parent)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise damaged(path, f"cannot be read ({exc.strerror})") from None
        record = records[path.parent].get(path.name)
        if record is None:
            if SHARD_PATTERN.match(path.name):
                _note_unrecorded(path.parent)
        elif size != record["bytes"]:
            raise damaged(path, f"has {size} bytes, {record['bytes']} recorded (truncated?)")


def _check_content(path: Path) -> None:
    """The sha256 check of a process's first open of a recorded shard."""
    try:
        st = path.stat()
    except OSError as exc:
        raise damaged(path, f"cannot be read ({exc.strerror})") from None
    key, stamp = str(path.resolve()), (st.st_ino, st.st_size, st.st_mtime_ns)
    if _hashed.get(key) == stamp:
        return
    record = read_records(path.parent).get(path.name)
    if record is None:
        if SHARD_PATTERN.match(path.name):
            _note_unrecorded(path.parent)
        return
    reason = check_recorded(path, record)
    if reason is not None:
        raise damaged(path, reason)
    _hashed[key] = stamp


def open_shard(path: Path, check_hash: bool = True):
    """A ``pyarrow.parquet.ParquetFile`` for reading; ShardError (one line) when the file
    fails its record (``check_hash``: sha256 on this process's first open) or its footer."""
    import pyarrow.parquet as pq

    path = Path(path)
    if check_hash:
        _check_content(path)
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise damaged(path, f"is not a readable parquet file ({_describe(exc)})") from None


def read_texts(pf, path: Path, rg: int) -> list[str]:
    """The documents of row group ``rg`` of an open shard; ShardError when it does not decode."""
    try:
        return pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except Exception as exc:  # ZSTD errors are OSError, bad pages ArrowInvalid, ...
        raise damaged(path, f"row group {rg} does not decode ({_describe(exc)})") from None


def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Every document of the given shards, in order, one row group in memory at a time;
    each shard checked on open (``open_shard``)."""
    for path in map(Path, paths):
        pf = open_shard(path)
        for rg in range(pf.num_row_groups):
            yield from read_texts(pf, path, rg)


# ----------------------------------------------------------------------------- folders

BUILDING_MARKER = ".building"  # present while a folder is being (re)built


class FolderBusy(UsageError):
    """Another process holds the folder's lock: run again once it is done (exit 2)."""


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "download") -> Iterator[None]:
    """Exclusive, non-blocking lock on ``<folder>/.lock`` (``common.lock_folder``); FolderBusy
    naming the ``what`` run that holds it. Temp files a run killed hard left behind are swept
    once it is held."""

    def busy(lock_path: Path) -> FolderBusy:
        return FolderBusy(
            f"another {what} run is writing {folder} (lock {lock_path} is held);"
            " wait for it to finish"
        )

    with lock_folder(folder, busy):
        sweep_temp_files(folder)  # leftovers of a run killed hard (SIGKILL, power loss)
        yield


def clear_shards(folder: Path) -> None:
    for path in list_shards(folder):
        path.unlink()
    (folder / RECORDS_FILE).unlink(missing_ok=True)


def check_shard(path: Path, record: dict | None, verify=None) -> tuple[str | None, dict | None]:
    """(why ``path`` is damaged or None, a record to add or None). A recorded file is checked
    by size and sha256; one without a record (an older nanochat wrote it) by ``verify``
    (default: decoding the shard whole), and when it passes its record is returned."""
    try:
        if record is not None:
            return check_recorded(path, record), None
        reason = (verify or verify_shard)(path)
        if reason is not None:
            return reason, None
        return None, {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    except OSError as exc:  # vanished or unreadable: fetched or built again
        return f"cannot be read ({one_line(exc)})", None


def folder_complete(folder: Path, adopt: bool = True) -> bool:
    """At least two shards, each matching its record (size and sha256), and no interrupted
    build. A shard without a record (written by an older nanochat) is decoded and, when it
    is whole, recorded if ``adopt`` (which writes the record file: the caller holds the
    folder lock); otherwise it makes the folder incomplete. A damaged shard is logged."""
    if (folder / BUILDING_MARKER).exists():
        return False
    found = list_shards(folder)
    if len(found) < 2:
        return False
    records = read_records(folder)
    adopted = {}
    for path in found:
        record = records.get(path.name)
        if record is None and not adopt:
            return False
        reason, new_record = check_shard(path, record)
        if new_record is not None:
            adopted[path.name] = new_record
        if reason is not None:
            log(f"{path} {reason}: the folder is built again")
            return False
    if adopted:
        save_records(folder, {**records, **adopted})
        log(f"recorded the sha256 of {len(adopted)} shard(s) in {folder} (decoded: whole)")
    return True


@contextlib.contextmanager
def building(folder: Path) -> Iterator[None]:
    """Mark the folder as being rebuilt (old shards and their records cleared); the mark goes
    only on success, so an interrupted build is never taken for a complete one."""
    marker = folder / BUILDING_MARKER
    marker.touch()
    clear_shards(folder)
    yield
    marker.unlink()
