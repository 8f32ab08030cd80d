"""The README stays true: its commands are the ones CI runs, its tables match the code,
and its main command works end to end (the smoke preset of it, into a temp BASE_DIR)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli

from backends.knobs import KNOBS
from backends.presets import PRESETS
from backends.stages import STAGES

README = (REPO / "README.md").read_text()


def _code_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]


def test_ci_runs_the_readme_test_command():
    assert "make test" in _code_lines()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith(("#", "set ", "cd "))] == [
        "make test"
    ]


def test_stage_table_matches_the_code():
    rows = re.findall(
        r"^\| ([a-z-]+) \| `([\w.]+)` \| (\w+) \| (.+?) \| (\w+) \|$", README, flags=re.M
    )
    assert [(name, module, hw) for name, module, hw, _, _ in rows] == [
        (s.name, s.module, s.hardware) for s in STAGES
    ]
    for (_, _, _, summary, status), stage in zip(rows, STAGES, strict=True):
        assert summary == stage.summary
        assert (status == "built") == stage.implemented(), stage.name


def test_every_knob_and_preset_is_documented():
    for knob in KNOBS:
        assert f"`{knob.make_var}" in README, knob.make_var
    for name, preset in PRESETS.items():
        row = re.search(rf"^\| `{name}` \|.*$", README, flags=re.M)
        assert row, name
        for key, value in preset.knobs.items():
            assert f"{key.upper()}={value}" in row.group(0)


@pytest.mark.first  # the longest test: started first, so the two workers end together
def test_main_command_runs_the_whole_pipeline_then_chats(base_dir):
    """The README's main command is `make speedrun PRESET=tiny` (about 6 minutes here). The
    suite runs the very same target on the smoke preset (tiny's model and stages, a few
    steps each) with RL=1: every stage, the report card with its table and plots, then
    `make chat-cli` answers. The full tiny run is measured in docs/benchmarks.md."""
    assert _code_lines()[0] == "make speedrun PRESET=tiny"
    result = run_cli(
        ["make", "--no-print-directory", "speedrun", "PRESET=smoke", "RL=1"], timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (base_dir / "report" / "report.md").read_text()
    table = report[report.index("| Metric | BASE | MID | SFT | RL |") :].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:9]}
    assert set(rows) == {"CORE", "ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval", "MMLU",
                         "ChatCORE"}  # fmt: skip
    assert re.search(r"\| CORE \| [0-9.]+ \|", rows["CORE"])
    assert re.fullmatch(r"\| ChatCORE \| - (\| -?[0-9.]+ ){3}\|", rows["ChatCORE"])
    for log in ("pretrain", "midtrain", "sft", "rl"):
        assert len(list((base_dir / "report").glob(f"{log}-*.png"))) == 1, log
    assert "| Metric | BASE | MID | SFT | RL |" in result.stdout  # printed at the end
    assert "make chat-cli PRESET=smoke" in result.stdout
    for stage in ("download", "tokenizer-eval", "base-eval", "chat-eval SOURCE=rl", "report"):
        assert f"speedrun: {stage} exited 0" in result.stderr, stage

    chat = run_cli(
        ["make", "--no-print-directory", "chat-cli", "PRESET=smoke", "ARGS=-p 'Hello' -t 0"]
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip()
