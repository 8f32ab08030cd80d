"""Stage "task-data": fetch the chat datasets' parquet files from the Hugging Face hub.

    python -m scripts.task_data                      # every task (make task-data)
    python -m scripts.task_data --only gsm8k mmlu    # a subset
    HF_ENDPOINT=https://mirror.example python -m scripts.task_data   # a hub mirror
    python -m scripts.task_data --tasks=embedded     # the tiny preset: nothing to fetch

Midtraining, SFT, RL and chat-eval read the hub versions of GSM8K, ARC, MMLU, HumanEval and
SmolTalk (``--tasks=hub``) from ``BASE_DIR/task_data/<name>/<split>/*.parquet``
(``nanochat.tasks.hub``, whose ``SOURCES`` table says which repo, config and splits each
task reads). For each split this stage asks the hub's parquet API
(``<endpoint>/api/datasets/<repo>/parquet/<config>/<split>``, a JSON list of file URLs)
and downloads the files as ``0000.parquet``, ``0001.parquet``, ... in the listed order, with
the shard downloader (``nanochat.data.download``): parallel, retried with backoff, each file
checked (readable parquet with the columns the task's converter reads) before it is
renamed into place. A split whose files were all fetched gets a ``.listing.json``; a later
run finds it, re-checks the files and sends no request at all (offline re-runs work), and
fetches only what is missing or damaged. One run at a time (``task_data/.lock``).
Exit codes: 0 done, 1 some file failed, 2 bad input, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from nanochat.common import (
    CliParser,
    atomic_write_text,
    base_dir,
    log,
    run_main,
)
from nanochat.data.download import (
    HUB,
    Downloader,
    Job,
    add_network_arguments,
    hub_endpoint,
    interruptible,
)
from nanochat.data.shards import folder_lock
from nanochat.tasks.hub import SOURCES, HubSource, task_data_dir, verify_file

LISTING = ".listing.json"  # per split: what was fetched (hidden from the *.parquet glob)
OUR_FILE = re.compile(r"^\d{4,}\.parquet$")


@dataclass(frozen=True)
class Split:
    name: str  # task name, the folder under task_data/
    split: str
    source: HubSource

    @property
    def folder(self) -> Path:
        return task_data_dir(self.name, self.split)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.split}"

    def verify(self, path: Path) -> str | None:
        return verify_file(path, self.source.columns)


def file_name(position: int) -> str:
    return f"{position:04d}.parquet"


def listing_url(endpoint: str, source: HubSource) -> str:
    """The parquet API address of one config; the split is appended by the caller."""
    return f"{endpoint}/api/datasets/{source.repo}/parquet/{quote(source.config, safe='')}"


def parse_listing(data: object, url: str) -> list[str]:
    """The file URLs of a listing (a JSON list of URLs), absolute, in shard order.
    ValueError when the document is not such a list."""
    if not isinstance(data, list) or not data or not all(isinstance(u, str) for u in data):
        raise ValueError(f"expected a non-empty JSON list of parquet URLs from {url}")
    urls = [urljoin(url, u) for u in data]

    def position(u: str) -> int | None:
        stem = urlsplit(u).path.rsplit("/", 1)[-1].removesuffix(".parquet")
        return int(stem) if stem.isdigit() else None

    # The API names files 0.parquet, 1.parquet, ...: order by that number (10 after 9)
    # when every name is one; otherwise keep the listed order.
    if all(position(u) is not None for u in urls):
        urls.sort(key=position)
    return urls


def cached_files(item: Split) -> list[Path] | None:
    """The split's files when an earlier run fetched all of them and they still verify."""
    try:
        meta = json.loads((item.folder / LISTING).read_text())
        count = len(meta["urls"])
        same = (meta["repo"], meta["config"], meta["split"]) == (
            item.source.repo,
            item.source.config,
            item.split,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    paths = [item.folder / file_name(i) for i in range(count)]
    if not same or not all(p.is_file() and item.verify(p) is None for p in paths):
        return None
    return paths


def finish_split(item: Split, urls: list[str], endpoint: str) -> None:
    """After every file of the split landed: drop our numbered files beyond the listing
    (a shorter listing than last time), then record the listing (atomically)."""
    keep = {file_name(i) for i in range(len(urls))}
    for path in item.folder.glob("*.parquet"):
        if OUR_FILE.match(path.name) and path.name not in keep:
            log(f"{item.label}: removing {path.name} (no longer in the hub's listing)")
            path.unlink()
    meta = {
        "repo": item.source.repo,
        "config": item.source.config,
        "split": item.split,
        "endpoint": endpoint,
        "urls": urls,
    }
    atomic_write_text(item.folder / LISTING, json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.task_data",
        description="Fetch the chat datasets' parquet files from the Hugging Face hub into "
        "$NANOCHAT_BASE_DIR/task_data/<name>/<split>/.",
    )
    parser.add_argument(
        "--tasks",
        choices=("hub", "embedded"),
        default="hub",
        help="hub: fetch the files; embedded: the chat stages use the embedded miniatures, "
        "so there is nothing to fetch (default: hub)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"fetch only these tasks: {', '.join(SOURCES)} (default: all)",
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        metavar="URL",
        help=f"hub address, or a mirror serving the same API (default: $HF_ENDPOINT, else {HUB})",
    )
    add_network_arguments(parser, "file")
    return parser


def _validate(parser: CliParser, args: argparse.Namespace) -> None:
    """Every usage error, before any disk or network work."""
    for name in args.only or ():
        if name not in SOURCES:
            parser.error(f"--only {name!r}: unknown task (known: {', '.join(SOURCES)})")
    if args.endpoint is None:
        args.endpoint = hub_endpoint()
    parts = urlsplit(args.endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        parser.error(f"--endpoint {args.endpoint!r}: expected an http(s) URL")
    args.endpoint = args.endpoint.rstrip("/")


def main(argv: list[str] | None = None) -> int:
    """Run the stage and return its exit code; usage errors exit 2 before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    if args.tasks == "embedded":
        print("task data: --tasks=embedded; the chat stages use the embedded miniatures, "
              "nothing to fetch")  # fmt: skip
        return 0
    names = [n for n in SOURCES if args.only is None or n in args.only]
    items = [Split(n, split, SOURCES[n]) for n in names for split in SOURCES[n].splits]
    root = base_dir() / "task_data"
    with interruptible("file"), folder_lock(root, what="task-data"):
        return _run(args, root, items)


def _run(args: argparse.Namespace, root: Path, items: list[Split]) -> int:
    start = time.monotonic()
    downloader = Downloader(
        args.endpoint,
        root,
        workers=args.workers,
        retries=args.retries,
        retry_delay=args.retry_delay,
        timeout=args.timeout,
    )
    failed: dict[str, str] = {}  # label -> reason
    cached = 0
    jobs: list[Job] = []
    listed: dict[Split, list[str]] = {}
    for item in items:
        for tmp in item.folder.glob(".*.tmp") if item.folder.is_dir() else ():
            tmp.unlink(missing_ok=True)  # leftovers of a run killed hard (SIGKILL)
        found = cached_files(item)
        if found is not None:
            cached += len(found)
            continue
        url = f"{listing_url(args.endpoint, item.source)}/{quote(item.split, safe='')}"
        data, error = downloader.get_json(url, f"{item.label} listing")
        if error is None:
            try:
                listed[item] = parse_listing(data, url)
            except ValueError as exc:
                error = str(exc)
        if error is not None:
            failed[f"{item.label} listing"] = error
            log(f"{item.label}: cannot list its parquet files: {error}")
            continue
        for position, file_url in enumerate(listed[item]):
            label = f"{item.label}/{file_name(position)}"
            path = item.folder / file_name(position)
            jobs.append(Job(file_url, path, label, verify=item.verify, label=label))
    if cached:
        log(f"{cached} file(s) fetched by an earlier run and still valid: skipped")
    downloader.close()  # the listing's connection; the files get one per worker thread
    summary = downloader.run_jobs(jobs)
    for key, reason in summary.failed.items():
        failed[key] = reason
        log(f"{key}: {reason}")
    for item, urls in listed.items():
        if not any(key.startswith(item.label + "/") for key in summary.failed):
            finish_split(item, urls, args.endpoint)
    if failed:
        first = next(iter(failed))
        print(
            f"error: {len(failed)} download(s) failed (first: {first}: {failed[first]}); "
            "re-run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(
        f"task data: {len(summary.fetched)} file(s) fetched, "
        f"{len(summary.skipped) + cached} skipped, {summary.bytes / 1e6:.1f} MB in "
        f"{time.monotonic() - start:.1f} s -> {root}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
