"""Stage 2: train the BPE tokenizer on the first training shards of a dataset.

    python -m scripts.tok_train                                  # ClimbMix, 2B chars, 32768
    python -m scripts.tok_train --dataset embedded --vocab-size 4096 --max-chars 100000000
    make tokenizer DATASET=climbmix                              # the same through the stage table

Reads training shards only (the last shard is validation and stays unseen), crops every
document to ``--doc-cap`` characters so a few huge documents cannot dominate the pair
counts, stops after ``--max-chars`` characters, trains with rustbpe, and saves
``BASE_DIR/tokenizer/`` (see nanochat/tokenizer.py) plus the report section ``tokenizer``.
Upstream's recipe: vocab 2^15, ~2B characters, documents capped at 10K chars.
A damaged shard (see nanochat/data/shards.py) stops it with one line naming the shard, exit 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from nanochat.common import CliParser, base_dir, die, log, positive_int, run_main
from nanochat.data.shards import check_sizes, data_dir, iter_texts, list_shards
from nanochat.model.dial import DEFAULT_VOCAB
from nanochat.report import write_section
from nanochat.tokenizer import MIN_VOCAB_SIZE, tokenizer_dir, train_tokenizer

PROGRESS_EVERY_S = 10.0


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.tok_train",
        description="Train the BPE tokenizer (stage 2).",
    )
    group = parser.add_argument_group("tokenizer training")
    group.add_argument(
        "--dataset",
        default="climbmix",
        help="dataset folder under BASE_DIR/base_data/ (default: climbmix; "
        "'embedded' builds the small offline corpus first)",
    )
    group.add_argument(
        "--max-chars",
        type=positive_int,
        default=2_000_000_000,
        help="total characters of training text to read, after cropping (default: 2e9)",
    )
    group.add_argument(
        "--vocab-size",
        type=positive_int,
        default=DEFAULT_VOCAB,
        help=f"tokens in the vocabulary, the 9 special tokens included; at least "
        f"{MIN_VOCAB_SIZE} (default: {DEFAULT_VOCAB} = 2^15)",
    )
    group.add_argument(
        "--doc-cap",
        type=positive_int,
        default=10_000,
        help="crop each document to this many characters (default: 10000)",
    )
    return parser


class CorpusReader:
    """Streams cropped training documents up to a character budget and counts what it read
    (the tokenizer records it; tok_eval uses it to find held-out training text)."""

    def __init__(self, paths: list[Path], max_chars: int, doc_cap: int):
        self.paths, self.max_chars, self.doc_cap = paths, max_chars, doc_cap
        self.chars = self.docs = self.shards = 0
        self.start = self.read_seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        self.start = time.monotonic()
        yield from self._documents()
        self.read_seconds = time.monotonic() - self.start
        log(
            f"read {self.chars:,} chars, {self.docs:,} docs in {self.read_seconds:.1f} s; "
            "counting and merging"
        )

    def _documents(self) -> Iterator[str]:
        last_log = self.start
        for index, path in enumerate(self.paths):
            self.shards = index + 1
            for text in iter_texts([path]):
                text = text[: min(self.doc_cap, self.max_chars - self.chars)]
                self.chars += len(text)
                self.docs += 1
                yield text
                if self.chars >= self.max_chars:
                    return
                now = time.monotonic()
                if now - last_log >= PROGRESS_EVERY_S:
                    last_log = now
                    log(
                        f"read {self.chars / 1e6:,.1f}M chars, {self.docs:,} docs, shard "
                        f"{self.shards}/{len(self.paths)} "
                        f"({self.chars / (now - self.start) / 1e6:.2f}M chars/s)"
                    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # --- checks before any work ------------------------------------------------------
    if args.vocab_size < MIN_VOCAB_SIZE:
        die(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + 9 special tokens + 1 merge), got {args.vocab_size}"
        )
    base = base_dir()
    if args.dataset == "embedded":
        from nanochat.data.dataset import ensure_embedded

        directory = ensure_embedded(base)
    else:
        directory = data_dir(base, args.dataset)
    shards = list_shards(directory)
    if len(shards) < 2:
        what = "no shards" if not shards else "only a validation shard"
        die(f"{what} in {directory}: run `make download DATASET={args.dataset}` first")
    train_paths = shards[:-1]  # the last shard is validation: never trained on

    # --- train -----------------------------------------------------------------------
    log(
        f"training a {args.vocab_size:,}-token BPE on up to {args.max_chars:,} chars "
        f"of {args.dataset} ({len(train_paths)} training shards, docs cropped to "
        f"{args.doc_cap:,} chars)"
    )
    reader = CorpusReader(train_paths, args.max_chars, args.doc_cap)
    start = time.monotonic()
    check_sizes(train_paths)  # damaged data (ShardError): run_main says the work failed, exit 1
    tokenizer = train_tokenizer(reader, args.vocab_size)  # reading errors pass through
    seconds = time.monotonic() - start
    if reader.docs == 0:
        die(f"the training shards in {directory} hold no documents", code=1)
    if tokenizer.vocab_size < args.vocab_size:
        log(
            f"warning: the text yields only {tokenizer.vocab_size:,} tokens "
            f"(asked {args.vocab_size:,}); use more text or a smaller vocabulary"
        )

    # --- save and report -------------------------------------------------------------
    tokenizer.trained_on = {
        "dataset": args.dataset,
        "chars": reader.chars,
        "docs": reader.docs,
        "train_shards": reader.shards,
        "doc_cap": args.doc_cap,
        "seconds": round(seconds, 2),
        "read_seconds": round(reader.read_seconds, 2),
    }
    out = tokenizer.save(tokenizer_dir(base))
    facts = {
        "dataset": args.dataset,
        "vocab size": f"{tokenizer.vocab_size:,} (asked {args.vocab_size:,})",
        "training text": f"{reader.chars:,} chars, {reader.docs:,} docs, "
        f"{reader.shards} of {len(train_paths)} training shards",
        "doc cap": f"{args.doc_cap:,} chars",
        # rustbpe counts pairs of a buffer of documents while the next one is read, so
        # the second figure holds the last buffer's counting as well as the merges.
        "training time": f"{seconds:.1f} s ({reader.read_seconds:.1f} s reading, "
        f"{seconds - reader.read_seconds:.1f} s counting and merging)",
    }
    write_section(
        base,
        "tokenizer",
        "Tokenizer training",
        facts,
        metrics={"vocab_size": tokenizer.vocab_size},
        wall_seconds=seconds,
    )
    for key, value in facts.items():
        print(f"{key}: {value}")
    print(f"saved: {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
