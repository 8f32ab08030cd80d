"""Ablate the pretraining recipe on the CPU: each feature on and off, at equal tokens.

    python -m scripts.ablate                         # every cell not measured yet (hours)
    python -m scripts.ablate --depths 4 --epochs 1   # a part: d4, one epoch
    python -m scripts.ablate --table                 # the table from the results so far
    make ablate ARGS='--depths 4 --seeds 1'          # the same through make

A cell is (row, depth, epochs, seed). Each row is the baseline recipe (every switch off,
no weight decay, the classic schedules) plus one change, or the current defaults; each
cell is one real ``scripts.base_train`` run on the embedded corpus at a fixed shape of its
own (``SHAPE``: the tiny preset's when it was written, kept so that results stay comparable
if the preset changes: context 256, 8,192 tokens per step, LR x4, ~640K tokens an epoch), with the
val bits per byte evaluated every 40 steps on the whole val split, each token once. A
finished cell appends one JSON line to ``--results`` (default
docs/ablation/results.jsonl, kept in the repository), so a long ablation resumes where it
stopped and several sessions add up. ``--table`` prints the markdown table of
docs/benchmarks.md: per row, depth and horizon the mean final val bpb over the seeds, its
spread (max - min), the best evaluation of the run and tokens/s (the median over the cells
that had the machine to themselves; ``OMP_NUM_THREADS`` set marks a cell run beside another).

Not a stage: a bench tool beside pretrain. Its data and tokenizer live in
``BASE_DIR/ablate/`` (built on first use by the download and tokenizer scripts, offline).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    atomic_write_text,
    base_dir,
    log,
    positive_int,
    run_main,
)
from nanochat.training import recipe

STEPS_PER_EPOCH = 80  # 80 x 8,192 tokens ~ one pass over the embedded training split
SHAPE = (
    "--dataset=embedded", "--seq-len=256", "--total-batch=8192", "--device-batch=16",
    "--lr-scale=4", "--eval-every=40", "--eval-batches=10", "--save-every=0",
    "--core-every=0", "--sample-every=0", "--resume=never", "--compile=off",
)  # fmt: skip
# The recipe before issue 14: every switch off, no decay, the ramp, classic betas, full
# attention (what recipe.LEGACY records for old checkpoints).
BASELINE = recipe.as_flags(recipe.LEGACY)
# Each row: the baseline, then these flags (argparse keeps the last occurrence).
ROWS = {
    "baseline": (),
    "weight decay 0.28": ("--weight-decay=0.28",),
    "normuon": ("--normuon",),
    "muon-eq + muon+": ("--muon-eq",),
    "momentum cycle + split betas": ("--momentum=cycle", "--adam-betas=split"),
    "value embeds": ("--value-embeds",),
    "residual scalars": ("--residual-scalars",),
    "smear": ("--smear",),
    "backout": ("--backout",),
    "windows SSSL": ("--window-pattern=SSSL",),
    # Against the collapse at three epochs: a stronger decay, the recipe's own LR (the
    # tiny shape's x4 was fitted for one epoch), and the one-epoch winners together.
    "weight decay 2.0": ("--weight-decay=2.0",),
    "lr scale 1": ("--lr-scale=1",),
    "smear + windows + value embeds": ("--smear", "--window-pattern=SSSL", "--value-embeds"),
    # The winners at lower LRs: where the three-epoch collapse stops.
    **{
        f"smear + windows + value embeds, lr scale {scale}": (
            "--smear",
            "--window-pattern=SSSL",
            "--value-embeds",
            f"--lr-scale={scale}",
        )
        for scale in ("2", "1.33", "1")
    },
    "smear + windows, lr scale 1.33": ("--smear", "--window-pattern=SSSL", "--lr-scale=1.33"),
}
# What the table decided: the current defaults, with the tiny preset's LR rule (its x4 is
# for one pass over the data; E passes take 4 / E**2).
DEFAULTS_ROW = "defaults, LR per pass"
DEFAULTS_FLAGS = ("--lr-scale-per-pass",)
VAL_LINE = re.compile(r"(?:step (\d+): val bpb|done: val bpb) ([0-9.]+)")


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows", nargs="+", choices=(*ROWS, DEFAULTS_ROW), default=[*ROWS, DEFAULTS_ROW]
    )
    p.add_argument("--depths", nargs="+", type=positive_int, default=[4, 6])
    p.add_argument("--epochs", nargs="+", type=positive_int, default=[1, 3])
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 1..N per cell (default 3)")
    p.add_argument("--results", type=Path, default=Path("docs/ablation/results.jsonl"))
    p.add_argument("--table", action="store_true", help="print the table and stop")
    p.add_argument("--dry-run", action="store_true", help="list the cells to run and stop")
    return p


def cell_key(row: str, depth: int, epochs: int, seed: int) -> str:
    return f"{row}|d{depth}|{epochs}ep|s{seed}"


def load_results(path: Path) -> dict[str, dict]:
    """The finished cells by key; a line that is not a whole record (a write cut short
    before results were written atomically) is dropped with a note, and its cell runs again."""
    if not path.is_file():
        return {}
    results, torn = {}, 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            results[record["key"]] = record
        except (ValueError, KeyError, TypeError):
            torn += bool(line.strip())
    if torn:
        log(f"ablate: {path}: {torn} line(s) that are not whole records, their cells run again")
    return results


def add_result(path: Path, record: dict) -> None:
    """Append one cell's record: the whole file rewritten atomically (a kill keeps the old)."""
    records = [*load_results(path).values(), record]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def prepare(folder: Path) -> None:
    """The embedded corpus and the tiny tokenizer in ``folder`` (offline, a few minutes)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(folder)}
    if not (folder / "base_data" / "embedded").is_dir():
        log(f"ablate: building the embedded corpus in {folder}")
        subprocess.run([sys.executable, "-m", "scripts.download", "--dataset=embedded"],
                       env=env, check=True)  # fmt: skip
    if not (folder / "tokenizer" / "tokenizer.json").is_file():
        log(f"ablate: training the tiny tokenizer in {folder}")
        subprocess.run(
            [sys.executable, "-m", "scripts.tok_train", "--dataset=embedded", "--vocab-size=4096"],
            env=env, check=True,
        )  # fmt: skip


def run_cell(folder: Path, row: str, depth: int, epochs: int, seed: int) -> dict:
    """One pretraining run; its val evaluations, final bpb and median tokens/s."""
    # The row in the tag: cells of different rows may run side by side (one BASE_DIR, a
    # lock per tag) and each keeps its own step log.
    slug = re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")
    tag = f"ablate-{slug}-d{depth}-{epochs}ep-s{seed}"
    steps = STEPS_PER_EPOCH * epochs
    flags = DEFAULTS_FLAGS if row == DEFAULTS_ROW else (*BASELINE, *ROWS[row])
    command = [
        sys.executable, "-m", "scripts.base_train", f"--depth={depth}", *SHAPE,
        f"--num-steps={steps}", f"--seed={seed}", f"--tag={tag}", *flags,
    ]  # fmt: skip
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(folder)}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise UsageError(f"ablate: {row} d{depth} {epochs}ep seed {seed} failed: {tail}")
    evals = []
    for match in VAL_LINE.finditer(done.stdout + done.stderr):  # log() writes to stderr
        step = int(match.group(1)) if match.group(1) else steps
        evals.append((step, float(match.group(2))))
    if not evals:
        raise UsageError(f"ablate: {tag} printed no val bpb: {done.stderr[-300:]!r}")
    step_log = folder / "logs" / f"pretrain-{tag}.jsonl"
    ms = [json.loads(line)["ms"] for line in step_log.read_text().splitlines()[1:]]
    shutil.rmtree(folder / "base_checkpoints" / tag, ignore_errors=True)
    return {
        "row": row, "depth": depth, "epochs": epochs, "seed": seed, "steps": steps,
        "final_bpb": evals[-1][1], "best_bpb": min(b for _, b in evals), "evals": evals,
        "tokens_per_s": round(8192 / (statistics.median(ms) / 1000)),
        "wall_s": round(time.monotonic() - started, 1),
        "flags": list(flags), "key": cell_key(row, depth, epochs, seed),
        # Cells run side by side share the cores: their tokens/s are not the machine's.
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip


TABLE_HEAD = (
    "| row | depth | epochs | final val bpb (mean) | spread (max-min) | best eval (mean) "
    "| vs baseline | tokens/s | seeds |\n|---|---|---|---|---|---|---|---|---|"
)


def table(results: dict[str, dict], seeds: int = 3) -> str:
    """Per (row, depth, horizon): mean final bpb, spread, best eval, tokens/s, seeds. Cells
    with all ``seeds`` measured make the table; cells with fewer follow in a second one,
    the probes (single runs that steered the search, or cells still running)."""
    cells: dict[tuple, list[dict]] = {}
    for record in results.values():
        cells.setdefault((record["row"], record["depth"], record["epochs"]), []).append(record)
    order = [*ROWS, DEFAULTS_ROW]
    lines, probes = [TABLE_HEAD], []
    for (row, depth, epochs), runs in sorted(
        cells.items(), key=lambda kv: (kv[0][1], kv[0][2], order.index(kv[0][0]))
    ):
        finals = [r["final_bpb"] for r in runs]
        mean = statistics.fmean(finals)
        base = cells.get(("baseline", depth, epochs))
        delta = "" if not base or row == "baseline" else (
            f"{mean - statistics.fmean(r['final_bpb'] for r in base):+.4f}"
        )  # fmt: skip
        alone = [r["tokens_per_s"] for r in runs if not r.get("threads")]
        speed = f"{statistics.median(alone):,.0f}" if alone else "(shared)"
        spread = f"{max(finals) - min(finals):.4f}" if len(finals) > 1 else "-"
        (lines if len(runs) >= seeds else probes).append(
            f"| {row} | d{depth} | {epochs} | {mean:.4f} | {spread} "
            f"| {statistics.fmean(r['best_bpb'] for r in runs):.4f} | {delta} "
            f"| {speed} | {len(runs)} |"
        )
    if probes:
        lines += ["", f"Probes (fewer than {seeds} seeds):", "", TABLE_HEAD, *probes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = load_results(args.results)
    if args.table:
        print(table(results, args.seeds))
        return 0
    todo = [
        (row, depth, epochs, seed)
        for depth in args.depths
        for epochs in args.epochs
        for seed in range(1, args.seeds + 1)
        for row in args.rows
        if cell_key(row, depth, epochs, seed) not in results
    ]
    log(f"ablate: {len(todo)} cell(s) to run, {len(results)} already in {args.results}")
    if args.dry_run:
        for cell in todo:
            print(cell_key(*cell))
        return 0
    folder = base_dir() / "ablate"
    prepare(folder)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for n, cell in enumerate(todo, 1):
        record = run_cell(folder, *cell)
        add_result(args.results, record)
        log(f"ablate {n}/{len(todo)}: {record['key']} final {record['final_bpb']:.4f} "
            f"best {record['best_bpb']:.4f} ({record['wall_s']:.0f} s)")  # fmt: skip
    print(table(load_results(args.results), args.seeds))
    return 0


if __name__ == "__main__":
    run_main(main)
