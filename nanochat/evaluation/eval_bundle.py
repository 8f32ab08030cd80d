"""The CORE eval bundle's format: read a bundle folder into plain dataclasses, write one.

CORE is DCLM's 22-task ensemble, evaluated (stage base-eval) from one archive
whose single top folder ``eval_bundle/`` holds:

- ``core.yaml``: ``icl_tasks:``, a list of tasks, each with ``label``, ``dataset_uri`` (a path
  under ``eval_data/``, e.g. ``world_knowledge/arc_easy.jsonl``), ``num_fewshot`` (a one-item
  list such as ``[10]``), ``icl_task_type`` (``multiple_choice``, ``schema`` or
  ``language_modeling``) and an optional ``continuation_delimiter`` (default ``" "``);
- ``eval_data/<dataset_uri>``: one JSON object per line. multiple_choice: ``query``,
  ``choices``, ``gold`` (index); schema: ``context_options``, ``continuation``, ``gold``;
  language_modeling: ``context``, ``continuation``;
- ``eval_meta_data.csv``: one row per task; the columns used here are ``Eval Task`` (the label)
  and ``Random baseline``, the accuracy of guessing **in percent** (25 for four choices).

Every bundle is a folder ``BASE_DIR/eval_bundle/<name>/`` in that format plus ``bundle.json``
(where it came from), written last, so a folder that has it is complete: ``dclm/`` (downloaded
and extracted by nanochat/evaluation/bundle_fetch.py) and ``embedded/`` (the offline miniature
built by nanochat/offline/embedded_core.py). A folder is replaced whole (``replace_folder``),
never rewritten in place. core.yaml is read with PyYAML's ``safe_load`` (a key written twice
is an error); any problem with a file is one line saying which file and what is wrong.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanochat.common import one_line

BUNDLES = ("dclm", "embedded")
CORE_YAML = "core.yaml"
META_CSV = "eval_meta_data.csv"
DATA_DIR = "eval_data"
RECORD = "bundle.json"  # written last: marks a complete bundle folder

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "  # llm-foundry's default continuation_delimiter


class BundleError(RuntimeError):
    """The bundle cannot be fetched or read; the message says why (and the fix) in one line."""


def bundle_root(base: Path) -> Path:
    return Path(base) / "eval_bundle"


def bundle_dir(base: Path, name: str) -> Path:
    """``BASE_DIR/eval_bundle/<name>``: ``dclm`` or ``embedded``."""
    if name not in BUNDLES:
        raise ValueError(f"unknown bundle {name!r}; choose one of {', '.join(BUNDLES)}")
    return bundle_root(base) / name


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task: how to render its prompts and what guessing would score."""

    label: str
    task_type: str  # one of TASK_TYPES
    dataset_uri: str  # relative to eval_data/
    num_fewshot: int
    continuation_delimiter: str = DEFAULT_DELIMITER
    random_baseline: float = 0.0  # percent, as in eval_meta_data.csv


@dataclass(frozen=True)
class MCExample:
    """Multiple choice: the same query continued by each choice."""

    query: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class SchemaExample:
    """Schema: each context option continued by the same continuation."""

    context_options: tuple[str, ...]
    continuation: str
    gold: int


@dataclass(frozen=True)
class LMExample:
    """Language modelling: greedy decoding of ``context`` must reproduce ``continuation``."""

    context: str
    continuation: str


Example = MCExample | SchemaExample | LMExample


@dataclass(frozen=True)
class Bundle:
    """A bundle folder read from disk: its tasks (in core.yaml order), examples on demand."""

    name: str
    root: Path
    tasks: tuple[TaskSpec, ...]
    record: dict  # bundle.json: provenance (source, sha256, ...)

    def data_path(self, task: TaskSpec) -> Path:
        return self.root / DATA_DIR / task.dataset_uri

    def examples(self, task: TaskSpec) -> list[Example]:
        """The task's examples in file order; BundleError when the file is malformed."""
        try:
            return read_examples(self.data_path(task), task.task_type)
        except (OSError, ValueError) as exc:
            raise BundleError(f"task {task.label}: {one_line(exc)}") from None


# ----------------------------------------------------------------------------- core.yaml


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key written twice in one mapping (YAML keys are
    unique, but PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r}", key.start_mark
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> object:
    """One YAML document, safely (plain data only); ValueError saying where it is malformed."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        said = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = ", ".join(part for part in said if part) or one_line(exc)
        raise ValueError(f"{CORE_YAML} is not valid YAML: {where}{problem}") from None


def _yaml_string(text: str) -> str:
    """``text`` as a YAML scalar: plain when that reads back as the same string (no null,
    boolean or number look-alikes), double-quoted otherwise."""
    if re.fullmatch(r"[A-Za-z_][\w./-]*", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)  # a valid YAML double-quoted scalar


def render_core_yaml(tasks: Sequence[TaskSpec], header: str = "") -> str:
    """core.yaml text for ``tasks``, in the layout of the official file."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines.append("icl_tasks:")
    for task in tasks:
        lines += [
            "-",
            f"  label: {_yaml_string(task.label)}",
            f"  dataset_uri: {_yaml_string(task.dataset_uri)}",
            f"  num_fewshot: [{task.num_fewshot}]",
            f"  icl_task_type: {_yaml_string(task.task_type)}",
            f"  continuation_delimiter: {_yaml_string(task.continuation_delimiter)}",
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- reading


def parse_tasks(core_yaml: str, baselines: dict[str, float] | None = None) -> list[TaskSpec]:
    """Tasks from core.yaml text; ``baselines`` (label -> percent) fills random_baseline and
    must cover every task when given. ValueError on a malformed or unsupported task."""
    document = load_yaml(core_yaml)
    entries = document.get("icl_tasks") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError("core.yaml has no 'icl_tasks' list")
    tasks, seen = [], set()
    for n, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ValueError(f"icl_tasks item {n} is not a mapping")
        label = entry.get("label")
        where = f"task {label!r}" if label else f"icl_tasks item {n}"
        missing = [
            k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry
        ]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if label in seen:
            raise ValueError(f"{where} appears twice")
        seen.add(label)
        task_type = entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where}: icl_task_type {task_type!r} is not one of {TASK_TYPES}")
        shots = entry["num_fewshot"]
        if isinstance(shots, list) and len(shots) == 1:
            shots = shots[0]
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(
                f"{where}: num_fewshot must be one count like [10], got {entry['num_fewshot']!r}"
            )
        uri = entry["dataset_uri"]
        if not isinstance(uri, str) or uri.startswith("/") or ".." in Path(uri).parts:
            raise ValueError(f"{where}: dataset_uri must be a relative path, got {uri!r}")
        delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
        if not isinstance(delimiter, str):
            raise ValueError(f"{where}: continuation_delimiter must be a string")
        baseline = 0.0
        if baselines is not None:
            if label not in baselines:
                raise ValueError(f"{where} has no row in {META_CSV}")
            baseline = baselines[label]
        tasks.append(TaskSpec(str(label), task_type, uri, shots, delimiter, baseline))
    return tasks


def parse_baselines(text: str) -> dict[str, float]:
    """label -> random baseline (percent) from eval_meta_data.csv text."""
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if "Eval Task" not in columns or "Random baseline" not in columns:
        raise ValueError(f"{META_CSV} lacks the 'Eval Task' and 'Random baseline' columns")
    baselines = {}
    for row in reader:
        label = (row["Eval Task"] or "").strip()
        if not label:
            continue
        try:
            value = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{META_CSV}: random baseline of {label!r} is not a number: "
                f"{row['Random baseline']!r}"
            ) from None
        if not 0.0 <= value < 100.0:
            raise ValueError(
                f"{META_CSV}: random baseline of {label!r} must be a percent in [0, 100)"
            )
        baselines[label] = value
    return baselines


def render_meta_csv(
    tasks: Sequence[TaskSpec], counts: dict[str, int], descriptions: dict[str, str], category: str
) -> str:
    """eval_meta_data.csv text with the official file's columns (one row per task)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints",
         "Random baseline", "Centered Metric?", "Description"]
    )  # fmt: skip
    for task in tasks:
        writer.writerow(
            [task.label, category, task.task_type.replace("_", " "), task.num_fewshot,
             counts.get(task.label, ""), f"{task.random_baseline:g}", "",
             descriptions.get(task.label, "")]
        )  # fmt: skip
    return out.getvalue()


def parse_example(record: object, task_type: str) -> Example:
    """One jsonl record as a dataclass; ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")

    def text(key: str) -> str:
        value = record.get(key)
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string")
        return value

    def texts(key: str) -> tuple[str, ...]:
        value = record.get(key)
        if (
            not isinstance(value, list)
            or len(value) < 2
            or not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"'{key}' must be a list of at least two strings")
        return tuple(value)

    def gold(n: int) -> int:
        value = record.get("gold")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise ValueError(f"'gold' must be an index in [0, {n}), got {value!r}")
        return value

    if task_type == "multiple_choice":
        choices = texts("choices")
        return MCExample(text("query"), choices, gold(len(choices)))
    if task_type == "schema":
        options = texts("context_options")
        return SchemaExample(options, text("continuation"), gold(len(options)))
    if task_type == "language_modeling":
        continuation = text("continuation")
        if not continuation:
            raise ValueError("'continuation' is empty")
        return LMExample(text("context"), continuation)
    raise ValueError(f"unknown task type {task_type!r}")


def read_examples(path: Path, task_type: str) -> list[Example]:
    """Every example of one jsonl file, in file order (blank lines skipped)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_example(json.loads(line), task_type))
            except ValueError as exc:  # JSONDecodeError is one
                raise ValueError(f"{path}:{number}: {one_line(exc)}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def load_bundle(root: Path, name: str = "") -> Bundle:
    """Read a bundle folder (core.yaml + eval_meta_data.csv; data files are read per task).

    Raises BundleError when a file is missing or malformed.
    """
    root = Path(root)
    try:
        baselines = parse_baselines((root / META_CSV).read_text(encoding="utf-8"))
        tasks = parse_tasks((root / CORE_YAML).read_text(encoding="utf-8"), baselines)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read the eval bundle in {root}: {one_line(exc)}") from None
    missing = [t.dataset_uri for t in tasks if not (root / DATA_DIR / t.dataset_uri).is_file()]
    if missing:
        raise BundleError(f"the eval bundle in {root} lacks {DATA_DIR}/{missing[0]}")
    record = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    return Bundle(name or root.name, root, tuple(tasks), record)


def folder_complete(root: Path) -> bool:
    """True when bundle.json (written last) is there and every file core.yaml names exists."""
    if not (Path(root) / RECORD).is_file():
        return False
    try:
        load_bundle(root)
    except BundleError:
        return False
    return True


# ----------------------------------------------------------------------------- folders


def replace_folder(built: Path, final: Path) -> None:
    """Move the finished folder ``built`` to ``final``; an older ``final`` is moved aside
    first and deleted afterwards, so ``final`` is never half-written."""
    final = Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(built, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep(folder: Path, name: str) -> None:
    """Leftovers of a run killed hard: temp folders and temp files of ``name``."""
    for leftover in folder.glob(f".{name}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
