"""The CORE eval bundle: fetch it, verify it, read it into plain dataclasses.

CORE (DESIGN B.6) is DCLM's 22-task ensemble. nanochat evaluates it from one archive,
``https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip``, whose single top folder
``eval_bundle/`` holds:

- ``core.yaml``: ``icl_tasks:``, a list of tasks, each with ``label``, ``dataset_uri`` (a path
  under ``eval_data/``, e.g. ``world_knowledge/arc_easy.jsonl``), ``num_fewshot`` (a one-item
  list such as ``[10]``), ``icl_task_type`` (``multiple_choice``, ``schema`` or
  ``language_modeling``) and an optional ``continuation_delimiter`` (default ``" "``);
- ``eval_data/<dataset_uri>``: one JSON object per line. multiple_choice: ``query``,
  ``choices``, ``gold`` (index); schema: ``context_options``, ``continuation``, ``gold``;
  language_modeling: ``context``, ``continuation``;
- ``eval_meta_data.csv``: one row per task; the columns used here are ``Eval Task`` (the label)
  and ``Random baseline``, the accuracy of guessing **in percent** (25 for four choices).

Layout under ``BASE_DIR/eval_bundle/`` (one subfolder per bundle, same format in each):

    dclm.zip            the downloaded archive, kept so a damaged folder re-extracts offline
    dclm.zip.sha256     its sha256, recorded after the first download (sha256sum format)
    dclm/               the extracted bundle (core.yaml, eval_meta_data.csv, eval_data/) plus
                        bundle.json (where it came from, the archive's sha256)
    embedded/           the offline miniature bundle (nanochat/offline/embedded_core.py)

Robustness follows the shard downloader (nanochat/data/download.py): the archive is streamed into a
temp file, checked (a zip whose CRCs hold, with core.yaml, eval_meta_data.csv and every data
file core.yaml names) and only then renamed into place; transient failures are retried with
jittered exponential backoff. Extraction goes into a temp folder renamed into place, with
``bundle.json`` written last, so a folder that has it is complete; a complete bundle is never
fetched again. A lock file serializes concurrent runs.

No PyYAML in the environment: ``parse_yaml`` reads the small block-style subset core.yaml uses
(mappings, ``-`` lists, flow lists ``[10]``, quoted and plain scalars, comments) and rejects
anything else by line number.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import atomic_path, atomic_write_text, file_sha256, log, one_line

OFFICIAL_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
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


# ----------------------------------------------------------------------------- YAML subset


@dataclass(frozen=True)
class _Line:
    number: int
    indent: int
    text: str


def _strip_comment(text: str) -> str:
    """The line without a trailing ``# comment`` (a '#' at the start or after whitespace,
    outside quotes)."""
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote == '"' and ch == "\\":
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        i += 1
    return text.rstrip()


def _yaml_lines(text: str) -> list[_Line]:
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: tabs are not allowed in YAML indentation")
        body = _strip_comment(raw)
        stripped = body.strip()
        if not stripped or (stripped == "---" and not lines):
            continue
        lines.append(_Line(number, len(body) - len(body.lstrip(" ")), stripped))
    return lines


def _is_item(line: _Line) -> bool:
    return line.text == "-" or line.text.startswith("- ")


def _split_key(line: _Line) -> tuple[str, str] | None:
    """``key: rest`` -> (key, rest); None when the line is not a mapping entry."""
    text = line.text
    if text[0] in "\"'":
        end = _quoted_end(text, 0)
        key, after = _scalar(text[: end + 1], line.number), text[end + 1 :]
        if not after.startswith(":") or (len(after) > 1 and after[1] != " "):
            return None
        return str(key), after[1:].strip()
    match = re.match(r"^([^\s:\[\]{},#&*!|>'\"%@`][^:]*?)\s*:(?:\s+(.*))?$", text)
    if match is None:
        return None
    return match.group(1), (match.group(2) or "").strip()


def _quoted_end(text: str, start: int) -> int:
    quote = text[start]
    i = start + 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and i + 1 < len(text) and text[i + 1] == "'":
                i += 2  # '' is an escaped single quote
                continue
            return i
        i += 1
    raise ValueError(f"unterminated {quote}-quoted string: {text!r}")


def _split_flow(inner: str, number: int) -> list[str]:
    parts, current, i = [], "", 0
    while i < len(inner):
        ch = inner[i]
        if ch in "\"'":
            end = _quoted_end(inner, i)
            current += inner[i : end + 1]
            i = end + 1
            continue
        if ch in "[]{}":
            raise ValueError(f"line {number}: nested flow collections are not supported")
        if ch == ",":
            parts.append(current.strip())
            current = ""
        else:
            current += ch
        i += 1
    if current.strip():
        parts.append(current.strip())
    elif parts:
        raise ValueError(f"line {number}: empty item in a flow list")
    return parts


def _scalar(text: str, number: int) -> object:
    """A scalar (or flow list) written on one line."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"line {number}: unterminated flow list {text!r}")
        return [_scalar(part, number) for part in _split_flow(text[1:-1], number)]
    if text[0] in "{|>&*!%@`":
        raise ValueError(f"line {number}: unsupported YAML syntax {text!r}")
    if text[0] == '"':
        if _quoted_end(text, 0) != len(text) - 1:
            raise ValueError(f"line {number}: text after a quoted string: {text!r}")
        try:
            return json.loads(text)  # YAML's double-quoted escapes are JSON's (\n, \t, \", \u)
        except json.JSONDecodeError:
            raise ValueError(f"line {number}: unsupported escape in {text!r}") from None
    if text[0] == "'":
        if _quoted_end(text, 0) != len(text) - 1:
            raise ValueError(f"line {number}: text after a quoted string: {text!r}")
        return text[1:-1].replace("''", "'")
    lowered = text.lower()
    if lowered in ("null", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return text


def _parse_block(lines: list[_Line], pos: int) -> tuple[object, int]:
    if _is_item(lines[pos]):
        return _parse_list(lines, pos, lines[pos].indent)
    return _parse_mapping(lines, pos, lines[pos].indent)


def _nested(lines: list[_Line], pos: int, indent: int, same_level_list: bool):
    """The block that follows ``key:`` or ``-`` on line pos-1, or (None, pos) if none."""
    if pos < len(lines):
        nxt = lines[pos]
        if nxt.indent > indent or (same_level_list and nxt.indent == indent and _is_item(nxt)):
            return _parse_block(lines, pos)
    return None, pos


def _parse_list(lines: list[_Line], pos: int, indent: int) -> tuple[list, int]:
    items: list = []
    while pos < len(lines) and lines[pos].indent == indent and _is_item(lines[pos]):
        line = lines[pos]
        rest = line.text[1:].lstrip(" ")
        if not rest:
            value, pos = _nested(lines, pos + 1, indent, same_level_list=False)
        elif _split_key(_Line(line.number, 0, rest)) is not None and not rest.startswith("["):
            # "- key: value": a mapping whose first entry shares the dash's line.
            inner = indent + len(line.text) - len(rest)
            lines = [*lines[:pos], _Line(line.number, inner, rest), *lines[pos + 1 :]]
            value, pos = _parse_mapping(lines, pos, inner)
        else:
            value, pos = _scalar(rest, line.number), pos + 1
        items.append(value)
    if pos < len(lines) and lines[pos].indent > indent:
        raise ValueError(f"line {lines[pos].number}: unexpected indentation")
    return items, pos


def _parse_mapping(lines: list[_Line], pos: int, indent: int) -> tuple[dict, int]:
    result: dict = {}
    while pos < len(lines) and lines[pos].indent == indent and not _is_item(lines[pos]):
        line = lines[pos]
        entry = _split_key(line)
        if entry is None:
            raise ValueError(f"line {line.number}: expected 'key: value', got {line.text!r}")
        key, rest = entry
        if key in result:
            raise ValueError(f"line {line.number}: duplicate key {key!r}")
        if rest:
            result[key], pos = _scalar(rest, line.number), pos + 1
        else:
            # YAML lets a list sit at its key's own indentation ("icl_tasks:\n-\n  label: x").
            result[key], pos = _nested(lines, pos + 1, indent, same_level_list=True)
    if pos < len(lines) and lines[pos].indent > indent:
        raise ValueError(f"line {lines[pos].number}: unexpected indentation")
    return result, pos


def parse_yaml(text: str) -> object:
    """Parse the block-style YAML subset of core.yaml; ValueError (with a line number) on
    anything outside it (block scalars, anchors, flow mappings, several documents)."""
    lines = _yaml_lines(text)
    if not lines:
        return None
    if lines[0].indent != 0:
        raise ValueError(f"line {lines[0].number}: the document must start at column 0")
    value, pos = _parse_block(lines, 0)
    if pos != len(lines):
        raise ValueError(f"line {lines[pos].number}: unexpected {lines[pos].text!r}")
    return value


def _yaml_string(text: str) -> str:
    """``text`` as a YAML scalar: plain when that is unambiguous, double-quoted otherwise."""
    if re.fullmatch(r"[A-Za-z_][\w./-]*", text) and text.lower() not in ("null", "true", "false"):
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
    document = parse_yaml(core_yaml)
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


# ----------------------------------------------------------------------------- the archive


def _zip_prefix(names: Sequence[str]) -> str | None:
    """The folder inside the archive that holds core.yaml ('' or 'eval_bundle/'), the
    shallowest one when there are several; None when there is none."""
    found = [n[: -len(CORE_YAML)] for n in names if n == CORE_YAML or n.endswith("/" + CORE_YAML)]
    return min(found, key=lambda p: (p.count("/"), p)) if found else None


def verify_zip(path: Path) -> str | None:
    """None when ``path`` is a complete bundle archive, else the reason in a few words:
    the zip opens, every member's CRC holds, and it has core.yaml, eval_meta_data.csv and
    every data file core.yaml names (all in one folder)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefix = _zip_prefix(names)
            if prefix is None:
                return f"no {CORE_YAML} in the archive"
            if prefix + META_CSV not in names:
                return f"no {META_CSV} beside {CORE_YAML}"
            try:
                baselines = parse_baselines(archive.read(prefix + META_CSV).decode("utf-8"))
                tasks = parse_tasks(archive.read(prefix + CORE_YAML).decode("utf-8"), baselines)
            except (ValueError, UnicodeDecodeError) as exc:
                return one_line(exc)
            members = set(names)
            for task in tasks:
                if f"{prefix}{DATA_DIR}/{task.dataset_uri}" not in members:
                    return f"{DATA_DIR}/{task.dataset_uri} (task {task.label}) is missing"
            bad = archive.testzip()
            if bad is not None:
                return f"{bad} is damaged (CRC mismatch)"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        return f"not a readable zip archive ({one_line(exc)}; truncated?)"
    except OSError as exc:
        return f"cannot read it ({one_line(exc)})"
    return None


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    retry_delay: float = 2.0,
    timeout: float = 60.0,
) -> int:
    """GET ``url`` into ``dest`` atomically, verified with ``verify_zip``; returns its size.

    Transient failures (5xx, 408/429, dropped connections, short or invalid bodies) are
    retried with jittered exponential backoff; BundleError after the last attempt or at once
    on a 4xx. The same rules as the shard downloader, whose helpers this reuses.
    """
    import requests

    from nanochat.data.download import (
        CHUNK_BYTES,
        MAX_BACKOFF_S,
        RETRY_STATUS,
        USER_AGENT,
        describe_error,
        retry_after,
    )

    transient = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    )
    jitter = random.Random()
    with requests.Session() as session:
        session.headers["User-Agent"] = USER_AGENT
        session.headers["Accept-Encoding"] = "identity"  # so Content-Length = file size
        for attempt in range(1, retries + 1):
            wait_s = None
            try:
                with atomic_path(dest) as tmp:
                    with session.get(url, stream=True, timeout=timeout) as response:
                        status = response.status_code
                        if status in RETRY_STATUS or status >= 500:
                            wait_s = retry_after(response)
                            raise _Transient(f"HTTP {status}")
                        if status >= 400:
                            raise BundleError(f"HTTP {status} for {url}")
                        size = 0
                        with open(tmp, "wb") as out:
                            for chunk in response.iter_content(CHUNK_BYTES):
                                out.write(chunk)
                                size += len(chunk)
                        expected = response.headers.get("Content-Length", "")
                        if expected.isdigit() and int(expected) != size:
                            raise _Transient(f"length mismatch: got {size} of {expected} bytes")
                    reason = verify_zip(tmp)
                    if reason is not None:
                        raise _Transient(f"invalid archive: {reason}")
                return size
            except BundleError:
                raise
            except (*transient, _Transient) as exc:
                reason = describe_error(exc) if not isinstance(exc, _Transient) else str(exc)
                if attempt == retries:
                    raise BundleError(
                        f"{reason} (gave up after {attempt} attempts): {url}"
                    ) from None
                delay = retry_delay * 2 ** (attempt - 1) * jitter.uniform(1.0, 1.25)
                delay = min(max(delay, wait_s or 0.0), MAX_BACKOFF_S)
                log(f"eval bundle: {reason}; retry {attempt + 1}/{retries} in {delay:.1f} s")
                time.sleep(delay)
            except OSError as exc:
                raise BundleError(f"cannot write {dest}: {one_line(exc)}") from None
    raise AssertionError("unreachable")


class _Transient(Exception):
    pass


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """A blocking flock on ``folder/.lock``: a second run waits for the first one."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run to finish writing {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def extract(archive_path: Path, final: Path, record: dict) -> None:
    """Unpack the bundle folder of a verified archive into ``final`` atomically, with
    ``record`` as its bundle.json (written last)."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            prefix = _zip_prefix(archive.namelist())
            members = [n for n in archive.namelist() if n.startswith(prefix or "")]
            archive.extractall(tmp, members)  # extractall drops absolute paths and '..'
        inner = tmp / prefix if prefix else tmp
        atomic_write_text(inner / RECORD, json.dumps(record, indent=2) + "\n")
        replace_folder(inner, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_recorded_sha(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return None


def ensure_dclm(
    base: Path,
    source: str | None = None,
    *,
    retries: int = 5,
    retry_delay: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """The extracted DCLM bundle folder under ``base``, fetched and extracted if needed.

    ``source``: a mirror URL or a local zip (default: the official URL). A complete folder is
    used as is (nothing is fetched, whatever ``source`` says: delete the folder to replace
    it). Raises BundleError with the reason and the fix.
    """
    root = bundle_root(base)
    final = bundle_dir(base, "dclm")
    if folder_complete(final):
        return final
    with locked(root):
        if folder_complete(final):  # another run finished it while we waited
            return final
        sweep(root, "dclm")
        if source is not None and not _is_url(source):
            archive = Path(source).expanduser()
            if not archive.is_file():
                raise BundleError(f"--source {source}: no such file (give a zip or a URL)")
            reason = verify_zip(archive)
            if reason is not None:
                raise BundleError(f"--source {source} is not a complete eval bundle: {reason}")
            origin = str(archive.resolve())
            digest = file_sha256(archive)
        else:
            origin = source or OFFICIAL_URL
            archive, digest = _download(root, origin, retries, retry_delay, timeout)
        record = {
            "name": "dclm",
            "source": origin,
            "sha256": digest,
            "bytes": archive.stat().st_size,
            "extracted": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        extract(archive, final, record)
    if not folder_complete(final):
        raise BundleError(f"the eval bundle extracted into {final} is incomplete")
    return final


def _download(
    root: Path, url: str, retries: int, retry_delay: float, timeout: float
) -> tuple[Path, str]:
    """``root/dclm.zip`` fetched from ``url`` (or reused when its sha256 matches the record
    and it verifies), and its sha256, recorded in ``dclm.zip.sha256`` after the first
    download. A later download with another hash is reported and recorded."""
    archive = root / "dclm.zip"
    record_path = root / "dclm.zip.sha256"
    recorded = _read_recorded_sha(record_path)
    if archive.is_file() and recorded == file_sha256(archive) and verify_zip(archive) is None:
        log(f"eval bundle: re-extracting {archive} (its sha256 matches the record)")
        return archive, recorded
    start = time.monotonic()
    log(f"eval bundle: downloading {url}")
    size = fetch(url, archive, retries=retries, retry_delay=retry_delay, timeout=timeout)
    log(f"eval bundle: {size / 1e6:.1f} MB in {time.monotonic() - start:.1f} s -> {archive}")
    digest = file_sha256(archive)
    if recorded is not None and recorded != digest:
        log(
            f"eval bundle: warning: sha256 {digest[:12]}... differs from the one recorded at "
            f"the first download ({recorded[:12]}..., {record_path}); recording the new one"
        )
    if recorded != digest:
        atomic_write_text(record_path, f"{digest}  {archive.name}\n")
    return archive, digest


def ensure(base: Path, name: str, source: str | None = None, **fetch_options) -> Bundle:
    """The bundle ``name`` ('dclm' or 'embedded'), fetched or built when needed, then loaded."""
    if name == "embedded":
        if source is not None:
            raise BundleError("--source applies to the dclm bundle only (embedded is built here)")
        from nanochat.offline.embedded_core import ensure_embedded_bundle

        folder = ensure_embedded_bundle(base)
    elif name == "dclm":
        folder = ensure_dclm(base, source, **fetch_options)
    else:
        raise BundleError(f"unknown bundle {name!r}; choose one of {', '.join(BUNDLES)}")
    return load_bundle(folder, name)
