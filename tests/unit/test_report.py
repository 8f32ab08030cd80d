"""The report card: sections with JSON companions, and the report stage that stitches them."""

from __future__ import annotations

import json
import sys

from conftest import run_cli

from nanochat.report import environment, facts_path, section_path, write_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report():
    return run_cli([sys.executable, "-m", "scripts.report"], timeout=60)


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5:
            rows[cells[0]] = cells[1:]
    return rows


def make_base(base):
    """Sections as the stages write them: numbers as metrics, the wall time as data."""
    write_section(
        base, "tokenizer", "Tokenizer training", {"vocab size": "4,096"}, environment=False
    )
    write_section(
        base,
        "base-eval",
        "Base model evaluation",
        {"CORE": "0.1234 (embedded bundle, 5 tasks)", "seconds": "30.0"},
        "| task | acc |\n|---|---|\n| copa | 0.5 |",
        metrics={"CORE": 0.1234},
        wall_seconds=30.0,
    )
    write_section(
        base,
        "pretrain",
        "Base pretraining",
        {"depth": 4, "steps": 3, "wall time (this run)": "1.5 min"},
        wall_seconds=90.0,
    )
    logs = base / "logs"
    logs.mkdir(parents=True)
    rows = [{"step": i, "loss": 10.0 - i * 0.5, "lrm": 1.0, "ms": 12.0} for i in range(12)]
    text = "\n".join(json.dumps(r) for r in rows) + "\nnot json\n"
    (logs / "pretrain-d4.jsonl").write_text(text)


def test_write_section_keeps_markdown_and_adds_json(base_dir):
    path = write_section(base_dir, "sft", "SFT", {"steps": 7}, "body text", wall_seconds=90)
    assert path == section_path(base_dir, "sft")
    text = path.read_text()
    assert text.startswith("## SFT\ntimestamp: ") and "- steps: 7" in text
    assert "- environment:" in text and text.rstrip().endswith("body text")
    env = environment()
    assert f"  - torch: {env['torch']}" in text and f"  - git commit: {env['git commit']}" in text
    assert env["torch"] and env["git commit"]  # a version string, a hash or "unknown"
    record = json.loads(facts_path(base_dir, "sft").read_text())
    assert record["facts"] == {"steps": 7} and record["wall_seconds"] == 90.0
    assert record["environment"]["python"] == env["python"]
    assert str(base_dir) not in facts_path(base_dir, "sft").read_text()  # no personal paths
    bare = write_section(base_dir, "x", "X", {"a": 1}, environment=False).read_text()
    assert "environment" not in bare


def test_report_stitches_sections_table_and_plot(base_dir):
    make_base(base_dir)
    result = run_report()
    assert result.returncode == 0, result.stderr
    report = (base_dir / "report" / "report.md").read_text()
    titles = ["## Tokenizer training", "## Base pretraining", "## Base model evaluation"]
    positions = [report.index(t) for t in titles]
    assert positions == sorted(positions)  # pipeline order, not file-name order
    assert report.index("## Loss curves") < report.index("## Summary")
    assert report.rstrip().endswith("| ChatCORE | - | - | - | - |")  # ends with the table
    assert "- total wall time: 0.03 h (2 of 3 sections report one)" in report  # 90 s + 30 s
    # make_base's tokenizer section has no wall time, as sections written before it was data
    assert "report: tokenizer written by an older nanochat" in result.stderr

    rows = table_rows(result.stdout)
    assert rows["Metric"] == ["BASE", "MID", "SFT", "RL"]
    assert rows["CORE"] == ["0.1234", "-", "-", "-"]
    for row in ["ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval", "MMLU", "ChatCORE"]:
        assert rows[row] == ["-"] * 4

    png = base_dir / "report" / "pretrain-d4.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "![pretrain-d4 loss](pretrain-d4.png)" in report
    leftovers = [p.name for p in (base_dir / "report").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_chat_eval_metrics_fill_their_column(base_dir):
    make_base(base_dir)
    write_section(
        base_dir,
        "chat-eval-sft",
        "Chat evaluation (sft)",
        {"MMLU": "0.9000 (a fact is text: only metrics fill the table)"},
        metrics={"ARC-Easy": 0.38, "GSM8K": 0.05},
        environment=False,
    )
    write_section(base_dir, "sft", "Chat SFT", {"steps": 5}, environment=False)
    result = run_report()
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert rows["ARC-Easy"] == ["-", "-", "0.3800", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.0500", "-"]
    assert rows["MMLU"] == ["-", "-", "-", "-"]
    assert rows["CORE"][0] == "0.1234"
    report = (base_dir / "report" / "report.md").read_text()
    assert report.index("## Base model evaluation") < report.index("## Chat SFT")
    assert report.index("## Chat SFT") < report.index("## Chat evaluation (sft)")


def test_report_is_deterministic_apart_from_the_date(base_dir):
    make_base(base_dir)
    assert run_report().returncode == 0
    first = (base_dir / "report" / "report.md").read_text()
    assert run_report().returncode == 0  # report.md itself is not read back as a section
    second = (base_dir / "report" / "report.md").read_text()

    def strip(text):
        return [line for line in text.splitlines() if not line.startswith("- generated: ")]

    assert strip(first) == strip(second)


def test_no_sections_is_one_line_and_exit_2(base_dir):
    result = run_report()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no report sections in" in lines[0]
    assert "run a stage first" in lines[0]
    assert not (base_dir / "report" / "report.md").exists()
