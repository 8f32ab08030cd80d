"""The README stays true: its commands are the ones CI runs, its tables match the code,
and its main command works end to end (on the tiny preset, into a temp BASE_DIR)."""

from __future__ import annotations

import re

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


def test_main_command_trains_a_tokenizer(base_dir):
    """`make tokenizer PRESET=tiny`, then `make tokenizer-eval` prints the table."""
    assert "make tokenizer PRESET=tiny" in _code_lines()
    result = run_cli(["make", "--no-print-directory", "tokenizer", "PRESET=tiny"], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (base_dir / "tokenizer" / "tokenizer.json").is_file()
    assert len(list((base_dir / "base_data" / "embedded").glob("shard_*.parquet"))) >= 2
    evaluated = run_cli(["make", "--no-print-directory", "tokenizer-eval", "PRESET=tiny"])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "validation" in evaluated.stdout.lower()
