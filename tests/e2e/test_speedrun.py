"""`make speedrun`, the cost estimate and secrets: the parts every backend shares."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from conftest import run_cli

from backends import local, pricing, stages
from backends.command import StageCommand
from backends.launch import BackgroundRun, speedrun
from backends.planning import is_complete, plan, speedrun_plans
from backends.secrets import describe, load_secrets
from backends.stages import SPEEDRUN, STAGES_BY_NAME, SpeedrunEntry, Stage, remote_gpu
from nanochat.common import UsageError


def test_speedrun_refuses_to_start_with_unbuilt_stages(monkeypatch, base_dir):
    unbuilt = Stage("not-built", "scripts.not_built_yet", "a stage without its module", "cpu")
    monkeypatch.setitem(STAGES_BY_NAME, unbuilt.name, unbuilt)
    entries = (SpeedrunEntry("report"), SpeedrunEntry("not-built"))
    monkeypatch.setattr(stages, "SPEEDRUN", entries)
    with pytest.raises(
        UsageError, match="speedrun needs stage\\(s\\) not implemented yet: not-built \\(DRY_RUN"
    ):
        speedrun(preset="tiny")
    assert not base_dir.exists()
    assert speedrun(preset="tiny", dry_run=True) == 0  # a dry run still shows the plan


def test_speedrun_dry_run_prints_every_entry_in_order(capsys):
    assert speedrun(preset="tiny", dry_run=True) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    entries = [e for e in SPEEDRUN if e.when is None]
    assert len(commands) == len(entries) == 11
    for line, entry in zip(commands, entries, strict=True):
        assert f"-m {STAGES_BY_NAME[entry.stage].module}" in line
        for knob, value in entry.knobs.items():
            assert f"--{knob}={value}" in line
    headers = [line for line in lines if line.startswith("# [")]
    assert headers[7:10] == [
        "# [8] chat-eval SOURCE=mid",
        "# [9] sft SOURCE=mid",
        "# [10] chat-eval SOURCE=sft",
    ]
    assert not any("background" in line for line in lines)  # tiny: embedded data, no split


def test_rl_adds_rl_and_its_chat_eval_and_source_stays_a_mirror(capsys):
    mirror = "https://mirror.example/climbmix"
    labels = [p.label for p in speedrun_plans(preset="tiny", dry_run=True)]
    assert "rl SOURCE=sft" not in labels and "chat-eval SOURCE=rl" not in labels
    plans = speedrun_plans(preset="tiny", rl="1", source=mirror, dry_run=True)
    assert [p.label for p in plans][-4:] == [
        "chat-eval SOURCE=sft",
        "rl SOURCE=sft",
        "chat-eval SOURCE=rl",
        "report",
    ]
    assert [p.done_path for p in plans if p.stage.name == "chat-eval"] == [
        "report/chat-eval-mid.md",
        "report/chat-eval-sft.md",
        "report/chat-eval-rl.md",
    ]
    # The user's SOURCE is the download's mirror; the entries' own SOURCE wins elsewhere.
    assert f"--source={mirror}" in plans[0].command.argv
    assert all(mirror not in p.command.shell() for p in plans[1:])
    assert "note:" not in capsys.readouterr().err  # RL and SOURCE are used by the speedrun
    plan("sft", preset="tiny", rl="1", dry_run=True)
    assert "note: RL is not used by stage 'sft'" in capsys.readouterr().err


PROBE = """import os, sys
from pathlib import Path

base = Path(os.environ["NANOCHAT_BASE_DIR"])
with open(base / "ran.txt", "a") as log:
    log.write(f"{sys.argv[1]} {os.environ.get('NANOCHAT_RESUME', '-')}\\n")
(base / "report" / f"{sys.argv[1]}.md").write_text("done")
"""


def probe_stage(name: str, trains: bool) -> Stage:
    """A stage whose module (speedrun_probe, written by the test) logs that it ran."""
    return Stage(
        name,
        "speedrun_probe",
        "logs its name and NANOCHAT_RESUME",
        "cpu",
        writes=(f"{name}_checkpoints/",) if trains else (),
        preset_args={"tiny": (name,)},
        done=f"report/{name}.md",
    )


def test_force_reruns_a_complete_stage_and_every_later_one_from_scratch(
    monkeypatch, tmp_path, base_dir, capfd
):
    (tmp_path / "speedrun_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the launcher finds the module...
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # ...and so does the stage's process
    monkeypatch.delenv("NANOCHAT_RESUME", raising=False)
    probes = [probe_stage("mid", True), probe_stage("sft", True), probe_stage("eval", False)]
    for probe in probes:
        monkeypatch.setitem(STAGES_BY_NAME, probe.name, probe)
    monkeypatch.setattr(stages, "SPEEDRUN", tuple(SpeedrunEntry(p.name) for p in probes))
    (base_dir / "report").mkdir(parents=True)
    for probe in probes:  # every entry is complete
        (base_dir / "report" / f"{probe.name}.md").write_text("done")
    (base_dir / "report" / "report.md").write_text(
        "# card\n\n| Metric | SFT |\n|---|---|\n| GSM8K | 0.5 |\n"
    )

    assert speedrun(preset="tiny") == 0
    assert not (base_dir / "ran.txt").exists()  # all complete: all skipped
    assert speedrun(preset="tiny", force="sft") == 0
    assert (base_dir / "ran.txt").read_text().splitlines() == ["sft never", "eval -"]
    out, err = capfd.readouterr()
    assert "FORCE: sft, eval run again even if complete; sft start over" in err
    assert "mid is complete (report/mid.md); skipping" in err
    assert "| GSM8K | 0.5 |" in out  # the report card's table, then how to chat
    assert "chat with it: make chat-cli PRESET=tiny" in out


@pytest.mark.parametrize("front", ["make", "invoke"])
def test_unknown_force_is_one_line_and_exit_2(front, base_dir):
    argv = ["make", "--no-print-directory", "speedrun", "FORCE=sft,bogus"]
    if front == "invoke":
        argv = ["invoke", "speedrun", "--force", "sft,bogus"]
    result = run_cli(argv)
    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: FORCE: 'bogus' is not a speedrun stage; speedrun stages: ")
    assert "tokenizer-eval, pretrain" in first
    assert len(result.stderr.splitlines()) <= 2  # make adds its one-line trailer
    assert not base_dir.exists()


def test_background_download_where_it_helps(base_dir, capsys):
    assert speedrun(preset="speedrun", dry_run=True) == 0
    out = capsys.readouterr().out
    assert (
        "# download: first 8 shards now, the other 134 in the background while task-data, "
        "tokenizer, tokenizer-eval run; pretrain waits for it"
    ) in out
    plans = speedrun_plans(preset="speedrun", dry_run=True)
    assert [p.label for p in plans[:6]] == [
        "download SHARDS=8",
        "download SHARDS=142",
        "task-data",
        "tokenizer",
        "tokenizer-eval",
        "pretrain",
    ]
    assert "--shards=8" in plans[0].command.argv and "--shards=142" in plans[1].command.argv
    assert plans[1].background and plans[5].wait
    assert not any(p.background or p.wait for p in plans[:1] + plans[2:5] + plans[6:])
    # Not where it does not help: a download of only the tokenizer's 8 shards; a tokenizer
    # that is complete needs no head start.
    assert not any(p.background for p in speedrun_plans(preset="quick", shards=8, dry_run=True))
    (base_dir / "tokenizer").mkdir(parents=True)
    (base_dir / "tokenizer" / "tokenizer.json").write_text("{}")
    (base_dir / "report").mkdir()
    (base_dir / "report" / "tokenizer-eval.md").write_text("done")
    assert not any(p.background for p in speedrun_plans(preset="speedrun", dry_run=True))
    forced = speedrun_plans(preset="speedrun", force="tokenizer", dry_run=True)
    assert forced[1].background


def test_make_speedrun_dry_run_on_docker_wraps_each_stage():
    result = run_cli(["make", "--no-print-directory", "speedrun", "BACKEND=docker", "DRY_RUN=1"])
    assert result.returncode == 0, result.stderr
    runs = [line for line in result.stdout.splitlines() if line.startswith("docker run")]
    assert len(runs) == len([e for e in SPEEDRUN if e.when is None])


def test_completion_markers(base_dir):
    plans = {p.stage.name: p for p in speedrun_plans(preset="tiny", dry_run=True)}
    assert plans["tokenizer"].done_path == "tokenizer/tokenizer.json"
    assert plans["download"].done_path is None  # always re-checks its shards
    assert not is_complete(plans["tokenizer"])
    (base_dir / "tokenizer").mkdir(parents=True)
    (base_dir / "tokenizer" / "tokenizer.json").write_text("{}")
    assert is_complete(plans["tokenizer"])
    assert not is_complete(plans["download"])


def test_estimate_scales_with_the_gpus():
    base_eval = STAGES_BY_NAME["base-eval"]
    reference = pricing.estimate(base_eval, "speedrun", "H100:8", "H100:8")
    assert reference.hours == pricing.EXPECTED_HOURS["speedrun"]["base-eval"]
    container = 64 * pricing.CPU_CORE_PRICE + 256 * pricing.MEMORY_PRICE  # billed on top
    assert reference.cost == pytest.approx(
        reference.hours * (8 * pricing.GPU_PRICE["H100"] + container)
    )
    half = pricing.estimate(base_eval, "speedrun", "H100:4", "H100:8")
    assert half.hours == pytest.approx(2 * reference.hours)
    slower = pricing.estimate(base_eval, "speedrun", "A100-80GB:8", "H100:8")
    assert slower.hours > reference.hours
    cpu = pricing.estimate(STAGES_BY_NAME["download"], "speedrun", None, None)
    per_hour = 4 * pricing.CPU_CORE_PRICE + 8 * pricing.MEMORY_PRICE
    assert cpu.cost == pytest.approx(cpu.hours * per_hour)
    tokenizer = pricing.estimate(STAGES_BY_NAME["tokenizer"], "speedrun", None, None)
    assert "CPU x16" in tokenizer.line()  # CPU work in a big CPU container, no GPU rented
    assert pricing.gpu_hours("H100:8", 1800) == 4.0
    assert pricing.gpu_hours(None, 1800) == 0


def test_every_preset_and_stage_has_an_expected_time():
    for preset, hours in pricing.EXPECTED_HOURS.items():
        assert preset in pricing.REFERENCE_GPU
        derived = set() if preset == "tiny" else {"pretrain"}  # from the measured throughput
        assert {entry.stage for entry in SPEEDRUN} - derived <= set(hours), preset
    for spec in ("H100:8", "A100-80GB:4"):
        assert spec.partition(":")[0] in pricing.GPU_PRICE
        assert spec.partition(":")[0] in pricing.RELATIVE_SPEED


def test_remote_gpu_strings():
    pretrain, chat_cli = STAGES_BY_NAME["pretrain"], STAGES_BY_NAME["chat-cli"]
    download = STAGES_BY_NAME["download"]
    assert remote_gpu(pretrain, None) == "A100-80GB:4"
    assert remote_gpu(pretrain, "H100:8") == "H100:8"
    assert remote_gpu(chat_cli, "H100:8") == "H100"
    assert remote_gpu(STAGES_BY_NAME["tokenizer"], "H100:8") is None  # CPU work
    assert remote_gpu(pretrain, "H100") == "H100"
    assert remote_gpu(pretrain, "cpu") is None
    assert remote_gpu(download, "H100:8") is None


def test_secrets_from_env_win_over_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_API_KEY=from-file\nHF_TOKEN=hf-from-file\nOTHER=x\n")
    found = load_secrets(dotenv, environ={"WANDB_API_KEY": "from-env"})
    assert found == {"WANDB_API_KEY": "from-env", "HF_TOKEN": "hf-from-file"}
    assert load_secrets(tmp_path / "missing", environ={}) == {}
    line = describe(found)
    assert "WANDB_API_KEY" in line and "from-env" not in line and "hf-from-file" not in line


def test_local_backend_passes_secrets_to_the_stage(monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", "hf-value-for-the-child")
    base = plan("report", dry_run=True)
    probe = StageCommand(
        stage=base.stage,
        argv=[sys.executable, "-c", "import os; print(os.environ['HF_TOKEN'][:8])"],
        env=base.command.env,
        nproc=1,
    )
    code = local.execute(dataclasses.replace(base, command=probe))
    out, err = capfd.readouterr()
    assert code == 0
    assert out.strip() == "hf-value"  # the child got it
    assert "hf-value-for-the-child" not in err  # the launcher's log line does not show it


def test_background_run_goes_through_the_launcher_and_reports_failure(base_dir, capfd):
    # The background download is a second launcher process (python -m backends.launch);
    # port 9 on 127.0.0.1 refuses connections, so it fails fast, offline.
    knobs = {"preset": "tiny", "dataset": "climbmix", "shards": 1, "source": "http://127.0.0.1:9"}
    knobs["args"] = "--retries=1 --retry-delay=0"
    full = dataclasses.replace(plan("download", **knobs), label="download SHARDS=1")
    run = BackgroundRun(full)
    assert run.wait() == 1
    err = capfd.readouterr().err
    assert "download SHARDS=1 (background) exited 1" in err
    assert "failed; re-run the same command" in err  # the end of its log, shown
    assert run.log == base_dir / "logs" / "speedrun-download-background.log"
