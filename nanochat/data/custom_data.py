"""Stage 1 for your own documents: convert a local folder into parquet shards.

``convert_folder(source, folder, shard_chars)`` reads every ``*.parquet`` (column ``text``),
``*.jsonl`` (field ``text``) and ``*.txt`` (one document per file) under ``source``, in
sorted path order, and writes shards of about ``shard_chars`` characters to ``folder``; the
last shard is validation. A manifest (``.source.json``) records what was converted, so an
unchanged source is not converted again. The caller (``nanochat.data.dataset``) holds the lock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from nanochat.common import atomic_write_text, one_line
from nanochat.data import shards
from nanochat.data.shards import building, folder_complete

VALIDATION_FRACTION = 0.10  # custom data that fits one shard: last 10% of documents
MANIFEST = ".source.json"  # what a custom folder was converted from
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
            raise InputError(f"{path}: not a readable parquet file ({one_line(exc)})") from None
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
    if folder_complete(folder) and _read_json(manifest) == fingerprint:
        return 0, 0, len(shards.list_shards(folder))

    manifest.unlink(missing_ok=True)
    documents = chars = 0
    written = 0
    with building(folder):
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
