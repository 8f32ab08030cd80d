"""Stage "download" (stage 1): put pretraining text under ``BASE_DIR/base_data/<dataset>/``.

The first stage of the pipeline (data -> tokenizer -> pretrain -> eval -> midtrain -> SFT ->
RL -> chat/serve). Three kinds of data, one output format (parquet shards; the
highest-numbered shard is the validation split):

    # remote: shards 0..N-1 of a published dataset plus its validation shard, in parallel
    python -m scripts.download --dataset climbmix --shards 8
    python -m scripts.download --dataset fineweb-edu --shards 240 --workers 16
    # the same files from a mirror (same file names under that URL)
    python -m scripts.download --dataset climbmix --shards 8 --source https://mirror.example/climbmix
    # your own documents: *.parquet (column text), *.jsonl (field text), *.txt (one per file)
    python -m scripts.download --dataset mydocs --source /path/to/folder
    # the tiny offline corpus (stdlib docstrings; what the tiny preset uses)
    python -m scripts.download --dataset embedded

This entry point checks the flags (every usage error before any disk or network work) and
calls ``nanochat.data.dataset``, which documents how shards are fetched, verified and
recorded. A shard under its final name is always whole; a re-run fetches or rebuilds only
missing or damaged ones. One run per folder at a time. Exit codes: 0 done, 1 some shard
failed (or a damaged shard that cannot be fetched again), 2 bad input, 130 Ctrl-C, 143
SIGTERM.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.common import CliParser, base_dir, positive_int, run_main
from nanochat.data import shards
from nanochat.data.dataset import (
    DATASET_NAME,
    EMBEDDED,
    REMOTE_DATASETS,
    convert_source,
    ensure_embedded,
    fetch_remote,
    source_kind,
)
from nanochat.data.download import add_network_arguments, interruptible


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.download",
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


def _validate(parser: CliParser, args: argparse.Namespace) -> None:
    """Every usage error, before any disk or network work."""
    name, kind = args.dataset, source_kind(args.source)
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
    with interruptible("shard"):
        if args.dataset == EMBEDDED:
            ensure_embedded(base)
            found = shards.list_shards(folder)
            megabytes = sum(p.stat().st_size for p in found) / 1e6
            print(f"embedded: {len(found)} shards ({megabytes:.1f} MB of parquet) in {folder}")
            return 0
        if source_kind(args.source) == "folder":
            return convert_source(args.dataset, args.source, folder, args.shard_chars)
        return fetch_remote(
            args.dataset,
            args.shards,
            args.source,
            folder,
            workers=args.workers,
            retries=args.retries,
            retry_delay=args.retry_delay,
            timeout=args.timeout,
        )


if __name__ == "__main__":
    run_main(main)
