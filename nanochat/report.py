"""Report card sections: every stage leaves one markdown file under ``BASE_DIR/report/``.

A section is written atomically as ``report/<stage>.md`` (re-running a stage replaces its
section), with a machine-readable companion ``report/<stage>.json`` beside it (see
``write_section``). The report stage (scripts/report.py) later stitches the sections into
``report/report.md``, reading numbers from the JSON files rather than parsing markdown.

Companion JSON keys (all optional except ``stage``, ``title``, ``timestamp``, ``facts``):

- ``facts``: the section's facts as written in the markdown (values as strings, numbers kept).
- ``metrics``: numbers for the summary table, by row name: ``CORE``, ``ARC-Easy``,
  ``ARC-Challenge``, ``GSM8K``, ``HumanEval``, ``MMLU``, ``ChatCORE`` (floats in [0, 1]).
  ``base-eval`` gives ``CORE`` (BASE column); ``chat-eval-<source>`` gives the chat metrics for
  the column of its source (base, mid, sft, rl). Stages add their own numbers (val_bpb, ...).
  Facts are text for people: the report card reads numbers from ``metrics`` only.
- ``wall_seconds``: the stage's wall time (the report card's total, GPU-hours and cost);
  ``gpus``: how many GPUs it held (0 = CPU).
- ``environment``: ``environment()`` below.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from nanochat.common import CHECKPOINT_KINDS, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]


def section_path(base: Path, stage: str) -> Path:
    return Path(base) / "report" / f"{stage}.md"


def facts_path(base: Path, stage: str) -> Path:
    """The machine-readable companion of ``section_path``: ``report/<stage>.json``."""
    return Path(base) / "report" / f"{stage}.json"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Short hash of the checkout's HEAD (+ " dirty" with uncommitted changes), or "unknown"."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        head = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        status = subprocess.run(
            [git, "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + (" dirty" if dirty else "")


def _gpus() -> tuple[str, int]:
    """(GPU name, count): from torch when the stage already imported it, else nvidia-smi.

    torch is not imported here: CPU stages (the tokenizer) would pay seconds for nothing.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                count = torch.cuda.device_count()
                return (torch.cuda.get_device_name(0), count) if count else ("none", 0)
        except Exception:  # a broken driver must not cost the stage its report
            pass
        return "none", 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none", 0
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "none", 0
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        return "none", 0
    return names[0], len(names)


def _torch_version() -> str:
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, object]:
    """Where a stage ran: GPU, torch, Python, OS, git commit. No hostnames, no paths."""
    name, count = _gpus()
    return {
        "GPU": name,
        "GPUs": count,
        "torch": _torch_version(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "git commit": git_commit(),
    }


_environment = environment  # write_section's keyword of the same name shadows the function


def _jsonable(value: object) -> object:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def write_section(
    base: Path,
    stage: str,
    title: str,
    facts: Mapping[str, object],
    body: str = "",
    *,
    environment: bool = True,
    metrics: Mapping[str, float] | None = None,
    wall_seconds: float | None = None,
) -> Path:
    """Write one stage's section: a title, a bullet per fact, then free markdown (tables).

    ``environment`` adds an "environment" sub-list (see ``environment()``); ``metrics`` and
    ``wall_seconds`` go only into the JSON companion ``report/<stage>.json`` (module doc),
    written before the markdown, which stays the stage's completion marker.
    """
    env = _environment() if environment else None
    timestamp = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"## {title}", f"timestamp: {timestamp}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    if env is not None:
        lines.append("- environment:")
        lines += [f"  - {key}: {value}" for key, value in env.items()]
    if body:
        lines += ["", body.rstrip()]
    record: dict[str, object] = {
        "stage": stage,
        "title": title,
        "timestamp": timestamp,
        "facts": {str(k): _jsonable(v) for k, v in facts.items()},
    }
    if metrics:
        record["metrics"] = {str(k): float(v) for k, v in metrics.items()}
    if wall_seconds is not None:
        record["wall_seconds"] = float(wall_seconds)
    if env is not None:
        record["environment"] = env
        record["gpus"] = env["GPUs"]
    atomic_write_text(facts_path(base, stage), json.dumps(record, indent=2) + "\n")
    path = section_path(base, stage)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --- the summary table (the report card's last part; the model card of an export) ------

PIPELINE = ("tokenizer", "tokenizer-eval", "pretrain", "base-eval", "midtrain", "sft", "rl")
SOURCES = CHECKPOINT_KINDS  # in pipeline order: the table's columns
COLUMNS = ("BASE", "MID", "SFT", "RL")
ROWS = ("CORE", "ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval", "MMLU", "ChatCORE")
CHAT_EVAL = "chat-eval-"
OUTPUT = "report.md"  # the report card, under report/


def stage_key(stage: str) -> tuple[int, int, str]:
    """Sort key: pipeline stages in order, then chat-eval by source, then the rest by name."""
    if stage in PIPELINE:
        return (0, PIPELINE.index(stage), "")
    if stage.startswith(CHAT_EVAL):
        source = stage[len(CHAT_EVAL) :]
        return (1, SOURCES.index(source) if source in SOURCES else len(SOURCES), source)
    return (2, 0, stage)


def find_sections(report_dir: Path) -> list[str]:
    if not report_dir.is_dir():
        return []
    stages = [p.stem for p in report_dir.glob("*.md") if p.name != OUTPUT]
    return sorted(stages, key=stage_key)


def load_record(report_dir: Path, stage: str) -> dict:
    """The section's JSON companion, or {} (an older section, or an unreadable file)."""
    path = report_dir / f"{stage}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def load_records(report_dir: Path) -> dict[str, dict]:
    """Every section's JSON companion, by stage, in pipeline order."""
    return {stage: load_record(report_dir, stage) for stage in find_sections(report_dir)}


def metric(record: dict, name: str) -> float | None:
    """A table number: the section's ``metrics[name]`` (stages write their numbers as data)."""
    value = (record.get("metrics") or {}).get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summary_table(records: dict[str, dict]) -> str:
    cells = {(row, col): None for row in ROWS for col in COLUMNS}
    cells[("CORE", "BASE")] = metric(records.get("base-eval", {}), "CORE")
    for source, col in zip(SOURCES, COLUMNS, strict=True):
        record = records.get(CHAT_EVAL + source)
        if record is None:
            continue
        for row in ROWS:
            value = metric(record, row)
            if value is not None:
                cells[(row, col)] = value
    lines = ["| Metric | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in ROWS:
        values = [cells[(row, col)] for col in COLUMNS]
        shown = ["-" if v is None else f"{v:.4f}" for v in values]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
