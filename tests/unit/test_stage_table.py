"""The stage table, presets and knobs produce the exact commands, on every front end."""

from __future__ import annotations

import importlib
import shlex

import pytest
from conftest import run_cli

from backends import command
from backends.catalog import OTHER_TARGETS, help_text
from backends.knobs import KNOBS
from backends.planning import plan
from backends.presets import PRESETS
from backends.stages import STAGES, STAGES_BY_NAME

ALL_STAGES = [s.name for s in STAGES]
PIPELINE = [
    "download",
    "task-data",
    "tokenizer",
    "tokenizer-eval",
    "pretrain",
    "base-eval",
    "midtrain",
    "sft",
    "rl",
    "chat-eval",
    "chat-cli",
    "chat-web",
    "report",
    "export",
    "push-hub",
]
# What a stage that cannot run without a knob (stage.needs) is given in these tests.
NEEDED = {"repo": "you/my-model"}


def needed(stage) -> dict[str, str]:
    return {name: NEEDED[name] for name in stage.needs}


def test_every_pipeline_stage_is_registered_in_order():
    assert ALL_STAGES == PIPELINE
    for stage in STAGES:
        assert stage.hardware in ("cpu", "gpu", "gpus")
        assert stage.module.startswith(("scripts.", "nanochat."))
        assert set(stage.knobs) <= {k.name for k in KNOBS}
        assert set(stage.preset_args) <= set(PRESETS)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_command_for_every_stage_and_preset(stage, preset):
    the_plan = plan(stage.name, preset=preset, gpus="4", dry_run=True, **needed(stage))
    cmd, dry = the_plan.command, the_plan.dry_run
    assert dry
    args = command.script_args(stage, preset, {**PRESETS[preset].knobs, **needed(stage)})
    if stage.multiprocess:
        expected = ["torchrun", "--standalone", "--nproc_per_node=4", "-m", stage.module, "--"]
    else:
        expected = ["python", "-m", stage.module]
    assert cmd.argv == expected + args
    # Only the stage's own knobs become flags, in the stage's order.
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    knob_flags = [f for f in flags if f.lstrip("-").replace("-", "_") in stage.knobs]
    given = {**PRESETS[preset].knobs, **needed(stage)}
    assert knob_flags == [
        "--" + k.replace("_", "-") for k in stage.knobs if given.get(k) is not None
    ]
    assert cmd.env["OMP_NUM_THREADS"].isdigit()
    assert cmd.env["NANOCHAT_BASE_DIR"]


def test_single_process_without_torchrun():
    cmd = plan("pretrain", gpus="1", dry_run=True).command
    assert cmd.argv[:3] == ["python", "-m", "scripts.base_train"]


def test_user_knobs_override_preset_and_args_come_last():
    cmd = plan(
        "tokenizer",
        preset="tiny",
        dataset="climbmix",
        args="--vocab-size=8192 --doc-cap 5",
        dry_run=True,
    ).command
    assert cmd.argv == [
        "python",
        "-m",
        "scripts.tok_train",
        "--dataset=climbmix",
        "--vocab-size=4096",
        "--vocab-size=8192",
        "--doc-cap",
        "5",
    ]


def test_base_dir_knob_reaches_the_environment(tmp_path):
    cmd = plan("download", base_dir=str(tmp_path / "art"), dry_run=True).command
    assert cmd.env["NANOCHAT_BASE_DIR"] == str(tmp_path / "art")


@pytest.mark.parametrize("stage", [s for s in STAGES if s.implemented()], ids=lambda s: s.name)
def test_preset_args_parse_with_the_stage_script(stage):
    """Every preset's flags are accepted by the script's own parser (built stages only;
    the others are checked to fail clearly in test_bad_input)."""
    module = importlib.import_module(stage.module)
    parser = module.build_parser()
    for preset in PRESETS:
        cmd = plan(stage.name, preset=preset, gpus="2", dry_run=True, **needed(stage)).command
        args = cmd.argv[cmd.argv.index(stage.module) + 1 :]
        parser.parse_args(args)  # exits 2 on any unknown or bad flag


def test_exact_pretrain_dry_run_through_make():
    result = run_cli(
        [
            "make",
            "--no-print-directory",
            "pretrain",
            "PRESET=speedrun",
            "DEPTH=12",
            "BACKEND=local",
            "GPUS=8",
            "DRY_RUN=1",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- "
        "--depth=12 --dataset=climbmix --ratio=12 --window-pattern=L"
    )


@pytest.mark.parametrize(
    "target, module",
    [("bench", "bench_train"), ("bench-engine", "bench_engine"), ("ablate", "ablate")],
)
def test_bench_tools_take_base_dir_and_dry_run(tmp_path, target, module):
    result = run_cli(
        ["make", "--no-print-directory", target, f"BASE_DIR={tmp_path}", "DRY_RUN=1", "ARGS=--help"]
    )
    assert result.returncode == 0, result.stderr
    command, note = result.stdout.strip().splitlines()
    assert command.endswith(f"-m scripts.{module} --help")
    assert note == f"# dry run: nothing ran; the command gets NANOCHAT_BASE_DIR={tmp_path}"


def test_make_and_invoke_print_the_same_command():
    via_make = run_cli(
        [
            "make",
            "--no-print-directory",
            "download",
            "PRESET=quick",
            "SHARDS=3",
            "ARGS=--workers 2",
            "DRY_RUN=1",
        ]
    )
    via_invoke = run_cli(
        [
            "invoke",
            "download",
            "--preset",
            "quick",
            "--shards",
            "3",
            "--args",
            "--workers 2",
            "--dry-run",
        ]
    )
    assert via_make.returncode == via_invoke.returncode == 0, via_make.stderr + via_invoke.stderr
    assert via_make.stdout == via_invoke.stdout
    assert shlex.split(via_make.stdout) == [
        "python",
        "-m",
        "scripts.download",
        "--dataset=climbmix",
        "--shards=3",
        "--workers",
        "2",
    ]


def test_make_help_and_invoke_list_show_every_stage():
    help_out = run_cli(["make", "--no-print-directory", "help"]).stdout
    assert help_out.strip() == help_text().strip()
    for stage in STAGES:
        assert stage.name in help_out and stage.summary in help_out
    for knob in KNOBS:
        assert knob.make_var + "=" in help_out
    for preset in PRESETS:
        assert preset in help_out
    listed = run_cli(["invoke", "--list"]).stdout
    # Task lines are indented two spaces; wrapped docstrings are indented further.
    names = {line.split()[0] for line in listed.splitlines() if line[:2] == "  " and line[2] != " "}
    # Every other target of `make help` is an invoke task too, except the Makefile's own.
    others = {name for name, _ in OTHER_TARGETS} - {"setup", "help", "browser"}
    assert names == set(ALL_STAGES) | others


def test_smoke_extends_tiny_and_its_flags_come_after_tinys():
    """smoke keeps tiny's knobs (but half its device batch) and flags; its own flags follow,
    so they win in argparse."""
    assert PRESETS["smoke"].knobs == {**PRESETS["tiny"].knobs, "device_batch": 8}
    assert PRESETS["smoke"].chain() == ("tiny", "smoke")
    args = command.script_args(STAGES_BY_NAME["pretrain"], "smoke", PRESETS["smoke"].knobs)
    assert args.index("--num-steps=80") < args.index("--num-steps=6")
    assert "--lr-scale=4" in args
