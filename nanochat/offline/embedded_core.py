"""A miniature CORE-style bundle built offline from the embedded corpus, for the tiny preset.

The DCLM bundle needs the internet, and its tasks (HellaSwag, ARC, Jeopardy...) sit far above
what a model trained for minutes on Python's docstrings can do. This bundle asks the same
three kinds of question about the kind of text the tiny model read, so its CORE can rise
above zero. Every item is taken from the **validation** split of the embedded corpus
(nanochat/offline/embedded_corpus.py): prose sentences of the docstrings the model never trained
on. Only word statistics come from the training split.

Tasks (``num_fewshot``, random baseline):

- ``sentence_ending`` (multiple choice, 0-shot, 25%): the first half of a sentence; the true
  second half versus the second halves of three other sentences of about the same length.
- ``next_word`` (multiple choice, 0-shot, 25%): a sentence up to some word; that word versus
  three words of about the same frequency in the training split (so the bare word
  frequencies do not give the answer away).
- ``context_swap`` (schema, 0-shot, 50%): the second half of a sentence after its own first
  half or after another sentence's first half.
- ``phrase_completion`` (language modelling, 3-shot, 0%): a sentence cut right after two
  words that the training split nearly always continues with the same word (``a list`` ->
  ``of``, ``This can`` -> ``be``); that word must come out of greedy decoding.
- ``echo`` (language modelling, 2-shot, 0%): a sentence, a line break, its first few words;
  the next word must be copied from the line above.

At most ``MAX_ITEMS`` per task (a fixed random subset). Built deterministically: the corpus
is deterministic per Python version, every choice comes from ``random.Random`` seeded with a
fixed string, nothing iterates over a set or depends on ``hash()``; the same Python version
gives byte-identical files. Written in the official bundle's format (core.yaml,
eval_meta_data.csv, ``eval_data/stdlib/<task>.jsonl``) into ``BASE_DIR/eval_bundle/embedded/``
(atomically: a temp folder renamed into place, bundle.json last), so the same loader reads
both bundles. ``bundle.json`` records the generator version and the Python version: a
bundle built by another one is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from nanochat.common import atomic_write_text, lock_folder, log
from nanochat.evaluation.eval_bundle import (
    CORE_YAML,
    DATA_DIR,
    META_CSV,
    RECORD,
    TaskSpec,
    bundle_dir,
    bundle_root,
    folder_complete,
    render_core_yaml,
    render_meta_csv,
    replace_folder,
    sweep,
)

GENERATOR_VERSION = 1  # bump when the items change: bundles of another version are rebuilt
MAX_ITEMS = 300
CATEGORY = "stdlib"

# Sentences: 6-40 words, a capital first and a period last, words made of letters, digits
# and light punctuation (no code), mostly letters.
MIN_WORDS, MAX_WORDS = 6, 40
WORD = re.compile(r"^[\w'`\"(),;:./-]+$")
ALPHA_WORD = re.compile(r"^[A-Za-z]+$")
MIN_LETTER_FRACTION = 0.7
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"(])")

FREQUENT_WORDS = 400  # next_word draws its answers and distractors from these
FREQUENCY_WINDOW = 20  # distractors rank within this many places of the answer
PHRASE_MIN_COUNT = 5  # a predictable bigram was seen this often in training...
PHRASE_MIN_SHARE = 0.4  # ...and continued with the same word at least this often

DESCRIPTIONS = {
    "sentence_ending": "The first half of a validation sentence of the stdlib docstrings; pick "
    "its true second half among four second halves of similar length.",
    "next_word": "A validation sentence up to some word; pick that word among four words of "
    "similar frequency in the training split.",
    "context_swap": "The second half of a validation sentence after two candidate first halves "
    "(its own and another sentence's); pick the one that fits.",
    "phrase_completion": "A validation sentence cut after two words that the training split "
    "nearly always continues with one word; greedy decoding must produce it.",
    "echo": "A validation sentence, a line break and its first words; greedy decoding must "
    "copy the next word from the line above.",
}


# ----------------------------------------------------------------------------- text


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs, each on one line; code-like ones (indented lines, doctests,
    reST literal blocks) are left out."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if any(line.startswith((" ", "\t")) for line in lines[1:]):
            continue
        if ">>>" in block or "::" in block:
            continue
        found.append(" ".join(line.strip() for line in lines))
    return found


def sentences(text: str) -> list[str]:
    """The clean prose sentences of one document, in order."""
    found = []
    for paragraph in _paragraphs(text):
        for sentence in SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            words = sentence.split()
            if not MIN_WORDS <= len(words) <= MAX_WORDS:
                continue
            if not (sentence[0].isupper() and sentence.endswith(".")):
                continue
            if not all(WORD.match(w) for w in words):
                continue
            if sum(ch.isalpha() for ch in sentence) < MIN_LETTER_FRACTION * len(sentence):
                continue
            found.append(sentence)
    return found


def _halves(sentence: str) -> tuple[str, str]:
    words = sentence.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def _sample_near(
    rng: random.Random, candidates: Sequence[int], key: Sequence[int], target: int, k: int
) -> list[int]:
    """A random ``k`` of the ``candidates`` whose ``key`` is within 2 of ``target`` (the
    window widens until it holds k of them)."""
    for width in range(2, max(key, default=0) + target + 2):
        near = [c for c in candidates if abs(key[c] - target) <= width]
        if len(near) >= k:
            return rng.sample(near, k)
    raise ValueError(f"fewer than {k} candidates")


def _capped(label: str, items: list[dict]) -> list[dict]:
    """At most MAX_ITEMS, a fixed random subset kept in its original order."""
    if len(items) <= MAX_ITEMS:
        return items
    keep = sorted(
        random.Random(f"embedded-core:{label}:subset").sample(range(len(items)), MAX_ITEMS)
    )
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------- tasks


def sentence_ending(pool: list[str]) -> list[dict]:
    halves = [_halves(s) for s in pool]
    tail_words = [len(tail.split()) for _, tail in halves]
    items = []
    for i, (head, tail) in enumerate(halves):
        rng = random.Random(f"sentence_ending:{i}")
        others = [j for j in range(len(pool)) if halves[j][1] != tail]
        distractors = [
            halves[j][1] for j in _sample_near(rng, others, tail_words, tail_words[i], 3)
        ]
        gold = rng.randrange(4)
        choices = distractors[:gold] + [tail] + distractors[gold:]
        items.append({"query": head, "choices": choices, "gold": gold})
    return _capped("sentence_ending", items)


def next_word(pool: list[str], train_texts: Sequence[str]) -> list[dict]:
    counts = Counter(w for text in train_texts for w in text.split() if ALPHA_WORD.match(w))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    frequent = [w for w in ranked if w.islower() and len(w) >= 2][:FREQUENT_WORDS]
    rank = {w: r for r, w in enumerate(frequent)}
    items = []
    for i, sentence in enumerate(pool):
        words = sentence.split()
        positions = [p for p in range(3, len(words) - 1) if words[p] in rank]
        if not positions:
            continue
        rng = random.Random(f"next_word:{i}")
        p = rng.choice(positions)
        answer = words[p]
        lo = max(0, rank[answer] - FREQUENCY_WINDOW)
        near = [w for w in frequent[lo : rank[answer] + FREQUENCY_WINDOW + 1] if w != answer]
        if len(near) < 3:
            continue
        distractors = rng.sample(near, 3)
        gold = rng.randrange(4)
        choices = distractors[:gold] + [answer] + distractors[gold:]
        items.append({"query": " ".join(words[:p]), "choices": choices, "gold": gold})
    return _capped("next_word", items)


def context_swap(pool: list[str]) -> list[dict]:
    halves = [_halves(s) for s in pool]
    head_words = [len(head.split()) for head, _ in halves]
    items = []
    for i, (head, tail) in enumerate(halves):
        rng = random.Random(f"context_swap:{i}")
        others = [j for j in range(len(pool)) if halves[j][0] != head]
        (j,) = _sample_near(rng, others, head_words, head_words[i], 1)
        gold = rng.randrange(2)
        options = [halves[j][0], head] if gold == 1 else [head, halves[j][0]]
        items.append({"context_options": options, "continuation": tail, "gold": gold})
    return _capped("context_swap", items)


def predictable_bigrams(train_texts: Sequence[str]) -> dict[tuple[str, str], str]:
    """(w1, w2) -> w3 when the training split continues w1 w2 with w3 often enough."""
    following: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for text in train_texts:
        words = text.split()
        for a, b, c in zip(words, words[1:], words[2:], strict=False):
            following[(a, b)][c] += 1
    predictable = {}
    for pair, counter in following.items():
        total = sum(counter.values())
        word, n = min(counter.items(), key=lambda item: (-item[1], item[0]))
        if total >= PHRASE_MIN_COUNT and n >= PHRASE_MIN_SHARE * total and ALPHA_WORD.match(word):
            predictable[pair] = word
    return predictable


def phrase_completion(pool: list[str], train_texts: Sequence[str]) -> list[dict]:
    predictable = predictable_bigrams(train_texts)
    items: dict[str, str] = {}  # context -> continuation, first occurrence kept
    for sentence in pool:
        words = sentence.split()
        for p in range(2, len(words) - 1):
            if predictable.get((words[p - 2], words[p - 1])) == words[p]:
                items.setdefault(" ".join(words[:p]), words[p])
    return _capped(
        "phrase_completion", [{"context": c, "continuation": w} for c, w in items.items()]
    )


def echo(pool: list[str]) -> list[dict]:
    items = []
    for i, sentence in enumerate(pool):
        words = sentence.split()
        positions = [p for p in range(2, len(words) - 1) if ALPHA_WORD.match(words[p])]
        if not positions:
            continue
        p = random.Random(f"echo:{i}").choice(positions)
        context = sentence + "\n" + " ".join(words[:p])
        items.append({"context": context, "continuation": words[p]})
    return _capped("echo", items)


def build_tasks(
    train_texts: Sequence[str], val_texts: Sequence[str]
) -> list[tuple[TaskSpec, list[dict]]]:
    """Every task with its items (jsonl records), from the corpus split."""
    pool = list(dict.fromkeys(s for text in val_texts for s in sentences(text)))
    if len(pool) < 10:
        raise ValueError(f"only {len(pool)} validation sentences: too few to build the bundle")
    built = [
        ("sentence_ending", "multiple_choice", 0, 25.0, sentence_ending(pool)),
        ("next_word", "multiple_choice", 0, 25.0, next_word(pool, train_texts)),
        ("context_swap", "schema", 0, 50.0, context_swap(pool)),
        ("phrase_completion", "language_modeling", 3, 0.0, phrase_completion(pool, train_texts)),
        ("echo", "language_modeling", 2, 0.0, echo(pool)),
    ]
    empty = [label for label, *_, items in built if not items]
    if empty:
        raise ValueError(f"the corpus yields no items for {', '.join(empty)}")
    return [
        (TaskSpec(label, kind, f"{CATEGORY}/{label}.jsonl", shots, " ", baseline), items)
        for label, kind, shots, baseline, items in built
    ]


def build_files(train_texts: Sequence[str], val_texts: Sequence[str]) -> dict[str, bytes]:
    """The bundle's files (relative path -> bytes), without bundle.json."""
    tasks = build_tasks(train_texts, val_texts)
    specs = [spec for spec, _ in tasks]
    header = (
        "Embedded miniature CORE bundle (nanochat/offline/embedded_core.py), generated from the\n"
        f"validation split of the embedded stdlib corpus; generator version {GENERATOR_VERSION}."
    )
    files = {
        CORE_YAML: render_core_yaml(specs, header).encode("utf-8"),
        META_CSV: render_meta_csv(
            specs,
            counts={spec.label: len(items) for spec, items in tasks},
            descriptions=DESCRIPTIONS,
            category=CATEGORY,
        ).encode("utf-8"),
    }
    for spec, items in tasks:
        lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        files[f"{DATA_DIR}/{spec.dataset_uri}"] = lines.encode("utf-8")
    return files


def files_digest(files: dict[str, bytes]) -> str:
    """One sha256 over every file's path and bytes, in path order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode("utf-8") + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- on disk


def _record_current(folder: Path) -> bool:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        record.get("generator") == GENERATOR_VERSION
        and record.get("python") == platform.python_version()
    )


def write_bundle(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temp folder beside ``folder`` and rename it into place, with
    bundle.json (generator, Python version, digest, item counts) written last."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for relative, data in files.items():
            path = tmp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        items = {
            Path(p).stem: data.count(b"\n") for p, data in files.items() if p.startswith(DATA_DIR)
        }
        record = {
            "name": "embedded",
            "generator": GENERATOR_VERSION,
            "python": platform.python_version(),
            "sha256": files_digest(files),
            "items": items,
        }
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_embedded_bundle(base: Path) -> Path:
    """``BASE_DIR/eval_bundle/embedded``, built from the embedded corpus when missing,
    incomplete, or made by another generator or Python version."""
    folder = bundle_dir(base, "embedded")
    if folder_complete(folder) and _record_current(folder):
        return folder
    root = bundle_root(base)
    with lock_folder(root):
        if folder_complete(folder) and _record_current(folder):
            return folder
        sweep(root, "embedded")
        from nanochat.offline import embedded_corpus

        train, val = embedded_corpus.split_corpus(embedded_corpus.build_corpus())
        files = build_files(train, val)
        write_bundle(folder, files)
    counts = json.loads((folder / RECORD).read_text(encoding="utf-8"))["items"]
    log(
        "embedded CORE bundle: "
        + ", ".join(f"{label} {n}" for label, n in counts.items())
        + f" items -> {folder}"
    )
    return folder
