"""Stage 1's library: the dataset table and the work of putting pretraining text under
``BASE_DIR/base_data/<dataset>/`` as parquet shards.

The first step of the pipeline (data -> tokenizer -> pretrain -> eval -> midtrain -> SFT ->
RL -> chat/serve); its entry point is ``scripts/download.py`` (``python -m scripts.download``,
the "download" stage), which parses the flags and calls the functions here. Three kinds of
data, one output format (``nanochat.data.shards``; the highest-numbered shard is the
validation split): shards of a published dataset (or a mirror of it) fetched by
``fetch_remote``, a local folder of documents converted by ``convert_source``, and the tiny
offline corpus (stdlib docstrings) built by ``ensure_embedded``.

Every shard is written to a temp file and every row group of it decoded
(``shards.verify_shard``) before it is renamed into place, so a shard under its final name is
always whole; from the hub (no source) its size and sha256 must also match the hub's
listing (``HF_ENDPOINT`` names a hub mirror). Each accepted shard's size and sha256 go into
the folder's ``.shards.json``; a re-run checks every shard present against it (sha256: about
0.1 s per 100 MB shard, in parallel) and fetches or rebuilds only missing or damaged ones.
One run per folder at a time (``<folder>/.lock``). The fetching is done by
``nanochat.data.download``, the converting by ``nanochat.data.custom_data``.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import log, one_line
from nanochat.data import shards
from nanochat.data.custom_data import InputError, convert_folder
from nanochat.data.download import Downloader, hub_endpoint
from nanochat.data.shards import ShardError, building, folder_complete, folder_lock

# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class RemoteDataset:
    repo: str  # Hugging Face dataset repo
    num_shards: int  # shard_00000 .. shard_<num_shards-1>; the last one is validation
    # Training tokens in one shard with the recipe's 32K vocabulary, roughly (~250M
    # characters; upstream: ~150 ClimbMix shards hold ~7B tokens). Presets are sized by it.
    tokens_per_shard: int = 46_000_000

    @property
    def validation_index(self) -> int:
        return self.num_shards - 1

    @property
    def base_url(self) -> str:
        return f"{hub_endpoint()}/datasets/{self.repo}/resolve/main"

    @property
    def listing_url(self) -> str:
        """The hub's paths-info API: size and LFS sha256 of the files asked for."""
        return f"{hub_endpoint()}/api/datasets/{self.repo}/paths-info/main"


# ClimbMix is the current recipe's data, FineWeb-EDU the original's.
REMOTE_DATASETS = {
    "climbmix": RemoteDataset("karpathy/climbmix-400b-shuffle", 6543),
    "fineweb-edu": RemoteDataset("karpathy/fineweb-edu-100b-shuffle", 1823),
}
EMBEDDED = "embedded"
DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

EMBEDDED_SHARD_CHARS = 1_000_000


def shard_indices(dataset: RemoteDataset, num_train: int) -> list[int]:
    """Training shards 0..num_train-1, then the validation shard (kept last by its index)."""
    return [*range(num_train), dataset.validation_index]


# ----------------------------------------------------------------------------- embedded


def ensure_embedded(base: Path) -> Path:
    """The embedded corpus folder under ``base``, built if it does not already hold a
    complete set (>= 2 valid shards, no interrupted build). Raises FolderBusy if another
    process is building it."""
    folder = shards.data_dir(base, EMBEDDED)
    if folder_complete(folder, adopt=False):  # without the lock: checks, never writes
        return folder
    with folder_lock(folder):
        if not folder_complete(folder):  # someone may have finished it while we waited
            _build_embedded(folder)
    return folder


def _build_embedded(folder: Path) -> None:
    from nanochat.offline import embedded_corpus

    start = time.monotonic()
    train, val = embedded_corpus.split_corpus(embedded_corpus.build_corpus())
    groups = _pack(train, EMBEDDED_SHARD_CHARS) + [val]
    with building(folder):
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


# ----------------------------------------------------------------------------- the work


def source_kind(source: str | None) -> str:
    """What a source names: "none" (the hub), "url" (a mirror) or "folder" (documents)."""
    if source is None:
        return "none"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        return "url"
    return "folder"


def fetch_remote(
    name: str,
    num_train: int,
    source: str | None,
    folder: Path,
    *,
    workers: int,
    retries: int,
    retry_delay: float,
    timeout: float,
) -> int:
    """Fetch training shards 0..num_train-1 and the validation shard of the remote dataset
    ``name`` into ``folder``, from the hub or the mirror URL ``source``; the network options
    are ``Downloader``'s. Prints the outcome; returns the exit code (0 done, 1 failed)."""
    dataset = REMOTE_DATASETS[name]
    # Every shard already in the folder is checked too (and fetched again when damaged):
    # pretraining reads them all, whatever SHARDS this run asks for.
    present = [int(shards.SHARD_PATTERN.match(p.name).group(1)) for p in shards.list_shards(folder)]
    indices = sorted(set(shard_indices(dataset, num_train)) | set(present))
    base_url = source or dataset.base_url
    with folder_lock(folder):
        downloader = Downloader(
            base_url,
            folder,
            workers=workers,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
        )
        # A mirror given as --source serves files only; the hub (or $HF_ENDPOINT) also lists
        # each file's size and sha256, which the fetched bodies must match.
        try:
            summary = downloader.run(indices, None if source else dataset.listing_url)
        except OSError as exc:  # the record file could not be written (a full disk)
            print(f"error: cannot write {folder}: {one_line(exc)}", file=sys.stderr, flush=True)
            return 1
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
    replaced = f", {len(summary.damaged)} damaged one(s) replaced" if summary.damaged else ""
    print(
        f"{name}: {len(summary.fetched)} shard(s) fetched, "
        f"{len(summary.skipped)} skipped{replaced}, {summary.bytes / 1e6:.1f} MB in "
        f"{summary.seconds:.1f} s -> {folder}"
    )
    return 0


def convert_source(name: str, source: str, folder: Path, shard_chars: int) -> int:
    """Convert the documents of the folder ``source`` into shards of about ``shard_chars``
    characters in ``folder`` (dataset ``name``). Prints the outcome; returns the exit code
    (0 done, 1 unreadable input or a full disk)."""
    start = time.monotonic()
    source_dir = Path(source).expanduser()
    try:
        with folder_lock(folder):
            documents, chars, count = convert_folder(source_dir, folder, shard_chars)
    except (InputError, ShardError, OSError) as exc:  # unreadable input, disk full: one line
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    if documents == 0:
        print(f"{name}: {count} shards already converted from {source_dir} -> {folder}")
    else:
        print(
            f"{name}: {documents} documents, {chars / 1e6:.1f} M chars -> {count} "
            f"shards (last = validation) in {time.monotonic() - start:.1f} s -> {folder}"
        )
    return 0
