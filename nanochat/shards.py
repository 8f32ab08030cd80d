"""The on-disk format of pretraining text: parquet shards with one string column ``text``.

``base_data/<dataset>/shard_NNNNN.parquet``, zstd, row groups of 1024 documents (DESIGN B.1).
The highest-numbered shard of a folder is the validation split; all others are training.
Stage 1 (``nanochat.dataset``) writes shards with this module; the tokenizer and the data
loader read them with it. The folder section is stage 1's guard for a folder being written:
one writer at a time (``<folder>/.lock``) and a ``.building`` marker while it is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanochat.common import atomic_path

ROW_GROUP_SIZE = 1024
SHARD_PATTERN = re.compile(r"^shard_(\d{5})\.parquet$")


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


def verify_shard(path: Path) -> str | None:
    """None when the shard is a readable parquet file with a string ``text`` column and rows;
    otherwise a short reason (truncated, not parquet, wrong schema...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
    except Exception as exc:  # pyarrow raises several types for a damaged file
        return f"not a readable parquet file ({exc.__class__.__name__}: {exc})"
    if "text" not in schema.names:
        return f"no 'text' column (columns: {', '.join(schema.names)})"
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        return f"column 'text' has type {text_type}, expected string"
    if meta.metadata.num_rows == 0:
        return "no rows"
    return None


def write_shard(path: Path, texts: Iterable[str], row_group_size: int = ROW_GROUP_SIZE) -> int:
    """Write documents as one shard, atomically. Returns the number of documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = list(texts)
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    return len(texts)


def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Every document of the given shards, in order, one row group in memory at a time."""
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


# ----------------------------------------------------------------------------- folders

BUILDING_MARKER = ".building"  # present while a folder is being (re)built


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
        sweep_temp_files(folder)  # leftovers of a run killed hard (SIGKILL, power loss)
        yield
    finally:
        os.close(fd)  # releases the lock


def sweep_temp_files(folder: Path) -> None:
    for tmp in folder.glob(".shard_*.tmp"):
        tmp.unlink(missing_ok=True)


def clear_shards(folder: Path) -> None:
    for path in list_shards(folder):
        path.unlink()


def folder_complete(folder: Path) -> bool:
    """At least two shards, all valid, and no interrupted build."""
    if (folder / BUILDING_MARKER).exists():
        return False
    found = list_shards(folder)
    return len(found) >= 2 and all(verify_shard(p) is None for p in found)


@contextlib.contextmanager
def building(folder: Path) -> Iterator[None]:
    """Mark the folder as being rebuilt (old shards cleared); the mark goes only on success,
    so an interrupted build is never taken for a complete one."""
    marker = folder / BUILDING_MARKER
    marker.touch()
    clear_shards(folder)
    yield
    marker.unlink()
