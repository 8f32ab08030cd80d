"""Report card sections: every stage leaves one markdown file under ``BASE_DIR/report/``.

A section is written atomically as ``report/<stage>.md`` (re-running a stage replaces its
section). The report stage later stitches the sections into ``report/report.md``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from nanochat.common import atomic_write_text


def section_path(base: Path, stage: str) -> Path:
    return Path(base) / "report" / f"{stage}.md"


def write_section(
    base: Path, stage: str, title: str, facts: Mapping[str, object], body: str = ""
) -> Path:
    """Write one stage's section: a title, a bullet per fact, then free markdown (tables)."""
    lines = [f"## {title}", f"timestamp: {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    if body:
        lines += ["", body.rstrip()]
    path = section_path(base, stage)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
