"""Stage 2 check: how well the tokenizer compresses text, next to GPT-2's and GPT-4's.

    python -m scripts.tok_eval                      # up to 10M chars per sample
    python -m scripts.tok_eval --max-chars 1000000
    make tokenizer-eval

Prints a table of token counts and bytes per token (higher = better compression) on
held-out training text (documents after those the tokenizer was trained on), the
validation shard, and a few short built-in samples (prose, code, math, non-English), and
writes it to the report section ``tokenizer-eval``.

GPT-2 (``gpt2``) and GPT-4 (``cl100k_base``) come from tiktoken, which downloads them on
first use. This stage never goes online: an encoding is used only when tiktoken's cache
already holds its files, otherwise its column reads "unavailable (offline)".

No tokenizer yet: one line, exit 2. A damaged tokenizer file or shard: one line naming the
file and the fix, exit 1.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nanochat.common import CliParser, UsageError, base_dir, log, positive_int, run_main
from nanochat.data.shards import data_dir, iter_texts, list_shards, open_shard
from nanochat.report import write_section
from nanochat.tokenizer import Tokenizer, tokenizer_dir

# The files tiktoken 0.14 fetches for each reference encoding, with the sha256 it checks
# (tiktoken_ext/openai_public.py). A cached file whose hash differs would be re-downloaded.
_BLOB = "https://openaipublic.blob.core.windows.net"
REFERENCES = {
    "GPT-2": (
        "gpt2",
        [
            (
                f"{_BLOB}/gpt-2/encodings/main/vocab.bpe",
                "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            ),
            (
                f"{_BLOB}/gpt-2/encodings/main/encoder.json",
                "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            ),
        ],
    ),
    "GPT-4": (
        "cl100k_base",
        [
            (
                f"{_BLOB}/encodings/cl100k_base.tiktoken",
                "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
            ),
        ],
    ),
}
UNAVAILABLE = "unavailable (offline)"

# Short samples of different kinds, written for this table.
BUILTIN_SAMPLES = {
    "prose": (
        "The lighthouse keeper wrote in her logbook every evening, long after the last "
        "ship had passed. Storms came in from the west, and on the worst nights she "
        "counted the seconds between flashes of lightning and the roll of thunder, "
        "estimating how far away the weather still was. In spring the gulls returned, "
        "nesting on the rocks below the tower, and the logbook filled with notes about "
        "eggs, chicks and the first clumsy flights over the harbour."
    ),
    "code": (
        "def moving_average(values: list[float], window: int = 3) -> list[float]:\n"
        '    """Average of each run of `window` consecutive values."""\n'
        "    if window < 1:\n"
        '        raise ValueError(f"window must be >= 1, got {window}")\n'
        "    total = sum(values[:window])\n"
        "    result = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        result.append(total / window)\n"
        "    return result\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which vanishes at x = 2, so the "
        "minimum is f(2) = 12 - 24 + 7 = -5. The integral of f from 0 to 4 is "
        "[x^3 - 6x^2 + 7x] evaluated from 0 to 4 = 64 - 96 + 28 = -4. Check: 1234 * 5678 = "
        "7006652 and 2^20 = 1048576; sqrt(144) + 17 % 5 = 14."
    ),
    "non-English": (
        "Der schnelle braune Fuchs springt über den faulen Hund, während es draußen "
        "regnet. Le château se dresse au-dessus de la vallée depuis le XIIe siècle. "
        "Москва — столица России и крупнейший город страны. "
        "東京は日本の首都で、世界でも有数の大都市です。"
        "서울은 한국의 수도입니다. "
        "La niña comió una manzana roja junto al río."
    ),
}


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.tok_eval",
        description="Compression of the trained tokenizer versus GPT-2 and GPT-4.",
    )
    group = parser.add_argument_group("tokenizer evaluation")
    group.add_argument(
        "--max-chars",
        type=positive_int,
        default=10_000_000,
        help="characters per sample from the train and validation shards (default: 1e7)",
    )
    return parser


# --- reference encodings, strictly offline -----------------------------------------------


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken 0.14 caches downloads in (tiktoken/load.py, read_file_cached):
    $TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache.
    None when caching is disabled (set to ""): tiktoken would always download."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(folder) if folder else None


def is_cached(url: str, sha256: str) -> bool:
    """True when tiktoken would read ``url`` from its cache (file named by the URL's sha1)
    instead of downloading it."""
    folder = tiktoken_cache_dir()
    if folder is None:
        return False
    path = folder / hashlib.sha1(url.encode()).hexdigest()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def load_reference(label: str):
    """The tiktoken Encoding for GPT-2 / GPT-4 if it loads without the network, else None."""
    import tiktoken

    name, files = REFERENCES[label]
    if not all(is_cached(url, sha256) for url, sha256 in files):
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # a reference column must never fail the stage
        log(f"{label} ({name}) failed to load from the cache: {exc}")
        return None


# --- samples ---------------------------------------------------------------------------


def take_chars(texts: Iterator[str], max_chars: int) -> list[str]:
    """Documents from ``texts`` until ``max_chars`` characters (the last one cropped)."""
    taken, total = [], 0
    for text in texts:
        text = text[: max_chars - total]
        taken.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return taken


def held_out_train(paths: list[Path], docs_seen: int, shards_seen: int) -> Iterator[str]:
    """Training documents after the first ``docs_seen`` (which the tokenizer read)."""
    # Shards before the last one training touched were read whole: skip them by metadata.
    first = max(shards_seen - 1, 0)
    skip = docs_seen - sum(open_shard(p, check_hash=False).metadata.num_rows for p in paths[:first])
    return itertools.islice(iter_texts(paths[first:]), max(skip, 0), None)


def shard_samples(tokenizer: Tokenizer, base: Path, max_chars: int) -> list[tuple[str, list]]:
    """(label, documents) for held-out train text and validation text; a sample that cannot
    be read becomes a label with no documents."""
    trained_on = tokenizer.trained_on
    dataset = trained_on.get("dataset")
    shards = list_shards(data_dir(base, dataset)) if dataset else []
    if len(shards) < 2:
        where = f"no shards of {dataset!r}" if dataset else "dataset unknown"
        return [(f"train ({where})", []), (f"validation ({where})", [])]
    train_paths, val_path = shards[:-1], shards[-1]
    held_out = take_chars(
        held_out_train(
            train_paths, int(trained_on.get("docs", 0)), int(trained_on.get("train_shards", 0))
        ),
        max_chars,
    )
    if held_out:
        samples = [("train (held out)", held_out)]
    else:
        # Training read every training document: fall back to the start, which it has seen.
        samples = [("train (seen in training)", take_chars(iter_texts(train_paths), max_chars))]
    samples.append(("validation", take_chars(iter_texts([val_path]), max_chars)))
    return samples


# --- table -----------------------------------------------------------------------------


def cell(encode_batch, texts: list[str], n_bytes: int) -> str:
    """'tokens (bytes/token)' for one encoding on one sample."""
    n_tokens = sum(len(ids) for ids in encode_batch(texts))
    ratio = f"{n_bytes / n_tokens:.2f}" if n_tokens else "-"
    return f"{n_tokens:,} ({ratio})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = base_dir()
    try:
        tokenizer = Tokenizer.load(tokenizer_dir(base))
    except FileNotFoundError as exc:  # not trained yet: run the stage before
        raise UsageError(str(exc)) from None
    # A damaged tokenizer (TokenizerError) or shard (ShardError) is not bad input: run_main
    # reports the work failed (exit 1).

    encoders = {"ours": tokenizer.encode}
    for label in REFERENCES:
        reference = load_reference(label)
        encoders[label] = None if reference is None else reference.encode_ordinary_batch

    samples = shard_samples(tokenizer, base, args.max_chars)
    samples += [(label, [text]) for label, text in BUILTIN_SAMPLES.items()]

    header = ["sample", "chars", "bytes", *(f"{label} tokens (bytes/token)" for label in encoders)]
    rows = []
    for label, texts in samples:
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        row = [label, f"{sum(len(t) for t in texts):,}", f"{n_bytes:,}"]
        for encode_batch in encoders.values():
            if not texts:
                row.append("-")
            elif encode_batch is None:
                row.append(UNAVAILABLE)
            else:
                row.append(cell(encode_batch, texts, n_bytes))
        rows.append(row)

    table = "\n".join(
        "| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *rows]
    )
    print(f"vocab size {tokenizer.vocab_size:,}; bytes/token: higher is better\n")
    print(table)
    facts = {
        "vocab size": f"{tokenizer.vocab_size:,}",
        "trained on": ", ".join(f"{k} {v}" for k, v in tokenizer.trained_on.items()) or "?",
        "max chars per sample": f"{args.max_chars:,}",
    }
    write_section(base, "tokenizer-eval", "Tokenizer evaluation", facts, table)
    return 0


if __name__ == "__main__":
    run_main(main)
