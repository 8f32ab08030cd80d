"""What the benchmarks share: the machine they ran on, and a row added to docs/benchmarks.md.

Used by the benchmark entry points ``scripts.bench_train`` (a pretraining step, the speed
behind the pretrain stage's cost estimate) and ``scripts.bench_engine`` (inference, as
chat/serve uses it); the pipeline's stages (data -> tokenizer -> pretrain -> eval ->
midtrain -> SFT -> RL -> chat/serve) never import it. torch is imported only to name the
machine.
"""

from __future__ import annotations

import platform
from pathlib import Path

from nanochat.common import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    """``1x <GPU name>``, or ``<N> threads of <CPU model>`` without a GPU."""
    import torch

    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{torch.get_num_threads()} threads of {cpu}"


def record(row: str, section: str, header: str) -> None:
    """Append a table row under ``section`` of docs/benchmarks.md (created when missing,
    the section with its ``header`` too)."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip() + f"\n\n{section}\n\n{header}\n"
    lines = text.splitlines()
    at = lines.index(section)
    end = at + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    while end > at and not lines[end - 1].strip():
        end -= 1
    lines.insert(end, row)
    atomic_write_text(BENCHMARKS, "\n".join(lines) + "\n")
