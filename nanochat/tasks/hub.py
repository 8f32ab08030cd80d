"""Reading the Hugging Face versions of the chat datasets from the local task-data cache.

``source="hub"`` tasks read every ``*.parquet`` file (sorted by name) in
``BASE_DIR/task_data/<name>/<split>/`` and turn each row into a conversation with the task's
converter. Nothing here touches the network: ``make task-data`` (``scripts.task_data``)
fills the cache from the Hugging Face hub, using ``SOURCES`` below (which repo, config and
splits each task reads, and the columns its converter needs, checked before a file is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanochat.common import base_dir


@dataclass(frozen=True)
class HubSource:
    repo: str  # Hugging Face dataset repo
    config: str  # its configuration (subset)
    splits: tuple[str, ...]  # every split the task class accepts
    columns: tuple[str, ...]  # the columns the task's converter reads


# task name (the folder under task_data/) -> where its parquet files come from
SOURCES = {
    "gsm8k": HubSource("openai/gsm8k", "main", ("train", "test"), ("question", "answer")),
    "arc-easy": HubSource(
        "allenai/ai2_arc", "ARC-Easy", ("train", "validation", "test"),
        ("question", "choices", "answerKey"),
    ),
    "arc-challenge": HubSource(
        "allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test"),
        ("question", "choices", "answerKey"),
    ),
    "mmlu": HubSource(
        "cais/mmlu", "all", ("test", "validation", "dev"), ("question", "choices", "answer")
    ),
    # one struct column "train" holding question/choices/answer/subject
    "mmlu-auxiliary_train": HubSource("cais/mmlu", "auxiliary_train", ("train",), ("train",)),
    "humaneval": HubSource(
        "openai/openai_humaneval", "openai_humaneval", ("test",),
        ("prompt", "canonical_solution", "test", "entry_point"),
    ),
    "smoltalk": HubSource(
        "HuggingFaceTB/smol-smoltalk", "default", ("train", "test"), ("messages",)
    ),
}  # fmt: skip
REPOS = {name: source.repo for name, source in SOURCES.items()}


def task_data_dir(name: str, split: str) -> Path:
    """Where the parquet files of one task split live: BASE_DIR/task_data/<name>/<split>/."""
    return base_dir() / "task_data" / name / split


def read_rows(name: str, split: str) -> list[dict]:
    """Every row of every parquet file of the split, in file-name order, as dicts.

    Raises FileNotFoundError naming the folder (and the dataset repo) when none is present,
    and ValueError naming the file when one is not readable parquet."""
    import pyarrow.parquet as pq

    folder = task_data_dir(name, split)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"{name} ({split}): no parquet files in {folder}; run `make task-data` "
            f"(python -m scripts.task_data) to fetch them from "
            f"https://huggingface.co/datasets/{REPOS.get(name, '?')}"
        )
    rows: list[dict] = []
    for path in files:
        try:
            rows += pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
    return rows


def verify_file(path: Path, columns: tuple[str, ...]) -> str | None:
    """None when ``path`` is a readable parquet file with every one of ``columns``;
    otherwise a short reason (truncated, not parquet, a column missing)."""
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as exc:  # pyarrow raises several types for a damaged file
        return f"not a readable parquet file ({exc.__class__.__name__}: {exc})"
    missing = [c for c in columns if c not in names]
    if missing:
        return f"no column {', '.join(missing)} (columns: {', '.join(names)})"
    return None


def row_error(name: str, index: int, exc: Exception) -> ValueError:
    return ValueError(f"{name}: row {index} has an unexpected layout ({exc!r})")
