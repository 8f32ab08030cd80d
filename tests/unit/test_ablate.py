"""The ablation tool (scripts/ablate.py): every row is a valid pretraining command, finished
cells are never run twice, and the table is the mean and spread of what was measured."""

from __future__ import annotations

import json

import pytest

from scripts import ablate, base_train


@pytest.mark.parametrize("row", list(ablate.ROWS))
def test_every_row_is_a_pretraining_command_that_differs_from_the_baseline_as_named(row):
    parser = base_train.build_parser()
    base = parser.parse_args(["--depth=4", *ablate.SHAPE, *ablate.BASELINE])
    args = parser.parse_args(["--depth=4", *ablate.SHAPE, *ablate.BASELINE, *ablate.ROWS[row]])
    changed = {k for k, v in vars(args).items() if getattr(base, k) != v}
    expected = {
        "baseline": set(),
        "weight decay 0.28": {"weight_decay"},
        "normuon": {"normuon"},
        "muon-eq + muon+": {"muon_eq"},
        "momentum cycle + split betas": {"momentum", "adam_betas"},
        "value embeds": {"value_embeds"},
        "residual scalars": {"residual_scalars"},
        "smear": {"smear"},
        "backout": {"backout"},
        "windows SSSL": {"window_pattern"},
        "weight decay 2.0": {"weight_decay"},
        "lr scale 1": {"lr_scale"},
        "smear + windows + value embeds": {"smear", "window_pattern", "value_embeds"},
        **{
            f"smear + windows + value embeds, lr scale {scale}": {
                "smear",
                "window_pattern",
                "value_embeds",
                "lr_scale",
            }
            for scale in ("2", "1.33", "1")
        },
        "smear + windows, lr scale 1.33": {"smear", "window_pattern", "lr_scale"},
    }[row]
    assert changed == expected
    # the baseline turns every switch off, whatever the defaults say
    assert not any(getattr(base, s.name) for s in ablate.recipe.SWITCHES)
    assert base.weight_decay == 0 and base.window_pattern == "L"


def test_the_defaults_row_is_the_recipe_defaults_with_the_tiny_lr_rule():
    parser = base_train.build_parser()
    plain = parser.parse_args(["--depth=4", *ablate.SHAPE])
    args = parser.parse_args(["--depth=4", *ablate.SHAPE, *ablate.DEFAULTS_FLAGS])
    changed = {k for k, v in vars(args).items() if getattr(plain, k) != v}
    assert changed == {"lr_scale_per_pass"}
    assert args.smear and args.value_embeds and args.window_pattern == "SSSL"


def record(row: str, seed: int, final: float, best: float, depth: int = 4) -> dict:
    return {
        "row": row, "depth": depth, "epochs": 1, "seed": seed, "final_bpb": final,
        "best_bpb": best, "tokens_per_s": 4000 + seed, "key": ablate.cell_key(row, depth, 1, seed),
    }  # fmt: skip


def test_table_means_spreads_and_deltas():
    results = {
        r["key"]: r
        for r in (
            record("baseline", 1, 2.50, 2.40),
            record("baseline", 2, 2.54, 2.44),
            record("smear", 1, 2.40, 2.40),
            record("smear", 2, 2.46, 2.41),
            record("backout", 1, 2.45, 2.44),
        )
    }
    lines = ablate.table(results, seeds=2).splitlines()
    assert lines[2] == "| baseline | d4 | 1 | 2.5200 | 0.0400 | 2.4200 |  | 4,002 | 2 |"
    assert lines[3] == "| smear | d4 | 1 | 2.4300 | 0.0600 | 2.4050 | -0.0900 | 4,002 | 2 |"
    # a cell short of its seeds is a probe, in its own table, with no spread
    assert lines[5] == "Probes (fewer than 2 seeds):"
    assert lines[-1] == "| backout | d4 | 1 | 2.4500 | - | 2.4400 | -0.0700 | 4,001 | 1 |"


def test_finished_cells_are_skipped(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(record("baseline", 1, 2.5, 2.4)) + "\n")
    argv = ["--rows", "baseline", "smear", "--depths", "4", "--epochs", "1", "--seeds", "2"]
    assert ablate.main([*argv, "--results", str(results), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == [
        "smear|d4|1ep|s1",
        "baseline|d4|1ep|s2",
        "smear|d4|1ep|s2",
    ]


def test_a_torn_results_line_reruns_its_cell_and_keeps_the_rest(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    whole = json.dumps(record("baseline", 1, 2.5, 2.4))
    results.write_text(whole + "\n" + whole[:40])  # a kill in the middle of a write
    assert list(ablate.load_results(results)) == ["baseline|d4|1ep|s1"]
    ablate.add_result(results, record("smear", 1, 2.4, 2.4))
    assert sorted(ablate.load_results(results)) == ["baseline|d4|1ep|s1", "smear|d4|1ep|s1"]
    assert all(json.loads(line) for line in results.read_text().splitlines())  # torn one gone
    assert not list(tmp_path.glob("*.tmp*"))
