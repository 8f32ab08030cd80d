"""Stage 1: put pretraining text under ``BASE_DIR/base_data/<dataset>/`` as parquet shards.

Three kinds of data, one output format (``nanochat.data.shards``; the highest-numbered shard is
the validation split):

    # remote: shards 0..N-1 of a published dataset plus its validation shard, in parallel
    python -m nanochat.data.dataset --dataset climbmix --shards 8
    python -m nanochat.data.dataset --dataset fineweb-edu --shards 240 --workers 16
    # the same files from a mirror (same file names under that URL)
    python -m nanochat.data.dataset --dataset climbmix --shards 8 --source https://mirror.example/climbmix
    # your own documents: *.parquet (column text), *.jsonl (field text), *.txt (one per file)
    python -m nanochat.data.dataset --dataset mydocs --source /path/to/folder
    # the tiny offline corpus (stdlib docstrings; what the tiny preset uses)
    python -m nanochat.data.dataset --dataset embedded

Every shard is written to a temp file and every row group of it decoded
(``shards.verify_shard``) before it is renamed into place, so a shard under its final name is
always whole; from the hub (no --source) its size and sha256 must also match the hub's
listing (``HF_ENDPOINT`` names a hub mirror). Each accepted shard's size and sha256 go into
the folder's ``.shards.json``; a re-run checks every shard present against it (sha256: about
0.1 s per 100 MB shard, in parallel) and fetches or rebuilds only missing or damaged ones.
One run per folder at a time (``<folder>/.lock``). Exit codes: 0 done, 1 some shard failed
(or a damaged shard that cannot be fetched again), 2 bad input, 130 Ctrl-C, 143 SIGTERM.

This module holds the dataset table, the embedded build and the CLI; the work is done by
``nanochat.data.download`` (remote shards) and ``nanochat.data.custom_data`` (a local folder).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.common import (
    CliParser,
    base_dir,
    log,
    one_line,
    positive_int,
    run_main,
)
from nanochat.data import shards
from nanochat.data.custom_data import InputError, convert_folder
from nanochat.data.download import (
    Downloader,
    Terminated,
    add_network_arguments,
    sigterm_as_interrupt,
)
from nanochat.data.shards import FolderBusy, ShardError, building, folder_complete, folder_lock

# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class RemoteDataset:
    repo: str  # Hugging Face dataset repo
    num_shards: int  # shard_00000 .. shard_<num_shards-1>; the last one is validation
    # Training tokens in one shard with the recipe's 32K vocabulary, roughly (~250M
    # characters; DESIGN B.1: ~150 ClimbMix shards hold ~7B tokens). Presets are sized by it.
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


def hub_endpoint() -> str:
    """The Hugging Face hub, or the mirror named by $HF_ENDPOINT (as for the task data)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


# DESIGN B.1: ClimbMix is the current recipe's data, FineWeb-EDU the original's.
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


# ----------------------------------------------------------------------------- CLI


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m nanochat.data.dataset",
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
    add_network_arguments(parser, "shard")
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
    previous = sigterm_as_interrupt()
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
    except ShardError as exc:  # a shard that does not read back right after it was written
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as exc:
        log("interrupted; no partial shard was left under a final name")
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_download(args: argparse.Namespace, folder: Path) -> int:
    dataset = REMOTE_DATASETS[args.dataset]
    # Every shard already in the folder is checked too (and fetched again when damaged):
    # pretraining reads them all, whatever SHARDS this run asks for.
    present = [int(shards.SHARD_PATTERN.match(p.name).group(1)) for p in shards.list_shards(folder)]
    indices = sorted(set(shard_indices(dataset, args.shards)) | set(present))
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
        # A mirror given as --source serves files only; the hub (or $HF_ENDPOINT) also lists
        # each file's size and sha256, which the fetched bodies must match.
        try:
            summary = downloader.run(indices, None if args.source else dataset.listing_url)
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
        f"{args.dataset}: {len(summary.fetched)} shard(s) fetched, "
        f"{len(summary.skipped)} skipped{replaced}, {summary.bytes / 1e6:.1f} MB in "
        f"{summary.seconds:.1f} s -> {folder}"
    )
    return 0


def _run_convert(args: argparse.Namespace, folder: Path) -> int:
    start = time.monotonic()
    source = Path(args.source).expanduser()
    try:
        with folder_lock(folder):
            documents, chars, count = convert_folder(source, folder, args.shard_chars)
    except (InputError, ShardError, OSError) as exc:  # unreadable input, disk full: one line
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    if documents == 0:
        print(f"{args.dataset}: {count} shards already converted from {source} -> {folder}")
    else:
        print(
            f"{args.dataset}: {documents} documents, {chars / 1e6:.1f} M chars -> {count} "
            f"shards (last = validation) in {time.monotonic() - start:.1f} s -> {folder}"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
