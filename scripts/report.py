"""Stage ``report``: stitch every stage's section into ``BASE_DIR/report/report.md``.

    python -m scripts.report

Reads ``report/<stage>.md`` in pipeline order (tokenizer, tokenizer-eval, pretrain,
base-eval, midtrain, sft, rl, chat-eval-<source>..., then any other section by name), and
writes ``report/report.md`` (atomic): a header (date, git commit, total wall time, GPU-hours,
a rough cost), the sections, a loss-curve PNG per step log ``logs/<name>.jsonl`` (written to
``report/<name>.png``), and last the summary table (rows CORE ... ChatCORE, columns
BASE/MID/SFT/RL), which is also printed on stdout.

Numbers come from the sections' JSON companions ``report/<stage>.json`` (nanochat/report.py
documents the keys): ``base-eval`` fills CORE for BASE; ``chat-eval-<source>`` fills the chat
metrics (``{"metrics": {"ARC-Easy": 0.38, ...}}``) of the column of its source (base, mid,
sft, rl). A cell with no number shows "-". Apart from the date line, the output depends only
on the files read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    atomic_path,
    atomic_write_text,
    base_dir,
    log,
    run_main,
)
from nanochat.prices import GPU_PRICE
from nanochat.report import (
    CHAT_EVAL,
    OUTPUT,
    PIPELINE,
    load_records,
    summary_table,
)

# The stages whose sections carry their wall time (tokenizer-eval's is negligible).
TIMED = tuple(s for s in PIPELINE if s != "tokenizer-eval")


def build_parser() -> CliParser:
    return CliParser(prog="python -m scripts.report", description=__doc__.split("\n\n")[0])


def wall_seconds(record: dict) -> float | None:
    value = record.get("wall_seconds")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def hourly_price(gpu: str) -> float | None:
    """USD per GPU-hour for a device name such as "NVIDIA H100 80GB HBM3" (rough)."""
    name = gpu.upper()
    for kind in sorted(GPU_PRICE, key=len, reverse=True):
        if kind.split("-")[0] in name and (kind.count("-") == 0 or kind.split("-")[1] in name):
            return GPU_PRICE[kind]
    return None


def totals(records: list[dict]) -> tuple[float, float, float | None, int]:
    """(wall seconds, GPU-hours, cost in USD or None, sections with a wall time)."""
    seconds = gpu_hours = cost = 0.0
    priced = True
    counted = 0
    for record in records:
        wall = wall_seconds(record)
        if wall is None:
            continue
        counted += 1
        seconds += wall
        gpus = record.get("gpus") or 0
        if isinstance(gpus, int) and gpus > 0:
            hours = wall / 3600 * gpus
            gpu_hours += hours
            price = hourly_price(str((record.get("environment") or {}).get("GPU", "")))
            if price is None:
                priced = False
            else:
                cost += hours * price
    return seconds, gpu_hours, (cost if priced else None), counted


def read_log(path: Path) -> tuple[list[tuple[int, float]], str]:
    """(step, value) points of a step log and what the value is: the mean ``reward`` where
    the log has one (RL: its loss hovers near 0 and says little), else the ``loss``. Lines
    that are not such records are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            int(row["step"])
            rows.append(row)
        except (ValueError, KeyError, TypeError):
            continue
    key = "reward" if rows and all("reward" in row for row in rows) else "loss"
    points = []
    for row in rows:
        try:
            points.append((int(row["step"]), float(row[key])))
        except (KeyError, TypeError, ValueError):
            continue
    return points, key


def smooth(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average, its window about 1/50 of the log (a short
    log barely smoothed, so the line does not lag behind a steep start)."""
    beta = min(0.99, max(0.0, 1 - 50 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_loss(points: list[tuple[int, float]], title: str, out: Path, label: str = "loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="raw")
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


def plots(base: Path, report_dir: Path) -> list[str]:
    """A PNG per step log; returns the markdown lines that embed them."""
    logs = sorted((base / "logs").glob("*.jsonl")) if (base / "logs").is_dir() else []
    lines = []
    for path in logs:
        points, key = read_log(path)
        if not points:
            log(f"skipping {path.name}: no step/loss records")
            continue
        try:
            plot_loss(points, f"{path.stem} {key}", report_dir / f"{path.stem}.png", key)
        except ImportError:
            log("matplotlib is not installed: no plots (it comes with the train extra)")
            return []
        lines.append(f"![{path.stem} {key}]({path.stem}.png)")
    return lines


def build(base: Path) -> tuple[str, str]:
    """(report.md text, summary table). Raises UsageError with no sections."""
    from nanochat.report import git_commit

    report_dir = base / "report"
    records = load_records(report_dir)
    stages = list(records)
    if not stages:
        raise UsageError(f"no report sections in {report_dir}: run a stage first")
    older = [s for s in stages if s in TIMED or s.startswith(CHAT_EVAL)]
    older = [s for s in older if records[s] and "wall_seconds" not in records[s]]
    if older:  # sections from before stages wrote their numbers as data
        log(
            f"report: {', '.join(older)} written by an older nanochat, without numbers as "
            "data: their cells and times are missing here; run those stages again to fill them"
        )
    seconds, gpu_hours, cost, counted = totals(list(records.values()))
    table = summary_table(records)

    out = [
        "# nanochat report card",
        "",
        f"- generated: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- git commit: {git_commit()}",
        f"- sections: {', '.join(stages)}",
        f"- total wall time: {seconds / 3600:.2f} h ({counted} of {len(stages)} sections "
        "report one)",
        f"- GPU-hours: {gpu_hours:.2f}",
        f"- estimated cost: {'n/a' if cost is None else f'${cost:.2f}'} "
        "(Modal list prices, GPU time only)",
        "",
    ]
    for stage in stages:
        out += [(report_dir / f"{stage}.md").read_text(encoding="utf-8").rstrip(), ""]
    images = plots(base, report_dir)
    if images:
        out += ["## Loss curves", ""]
        for image in images:
            out += [image, ""]
    out += ["## Summary", "", table]
    return "\n".join(out) + "\n", table


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    base = base_dir()
    text, table = build(base)
    path = base / "report" / OUTPUT
    atomic_write_text(path, text)
    log(f"wrote {path}")
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
