"""Fault class "input": bad values at the front door (make, invoke, the stage scripts) stop
with one line and exit 2 before anything runs or is written; knob values are data, never
make code; and make passes the stage's own exit code through (1 failed, 128+N killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, cli_env, run_cli
from helpers.pretrain import SMALL, holder_pid
from helpers.waiting import wait_for


def refused(result, text: str) -> str:
    """The one line a refused command printed (make's own 'Stop.' line, or the stage's),
    besides the launcher's "[nanochat] stage: command" and make's "make: *** ... Error 2"."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if not line.startswith(("[nanochat] ", "make: *** ["))
    ]
    assert len(lines) == 1 and text in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("knob", ["ARGS", "BASE_DIR", "RUN"])
def test_knob_values_are_data_not_make_code(tmp_path, base_dir, knob):
    marker = tmp_path / "ran"
    value = f"$(shell touch {marker})"
    args = {"ARGS": f"ARGS=--core-every=0 {value}", "BASE_DIR": f"BASE_DIR={base_dir}/{value}",
            "RUN": f"RUN={value}"}[knob]  # fmt: skip
    result = run_cli(["make", "pretrain", "DRY_RUN=1", f"BASE_DIR={base_dir}", args])
    assert not marker.exists()
    assert "$(shell touch" in result.stdout + result.stderr  # passed on as the text it is


@pytest.mark.parametrize(
    "argv, text",
    [
        (["RL=maybe"], "RL must be 1 or 0 (on or off), got 'maybe'"),
        (["DRY_RUN=perhaps"], "DRY_RUN must be 1 or 0"),
        (["PRESET="], "PRESET is empty: give it a value, or leave it out"),
        (["DEPTH="], "DEPTH is empty"),
    ],
)
def test_switches_and_empty_knobs_are_refused_by_make(base_dir, argv, text):
    result = run_cli(["make", "speedrun", f"BASE_DIR={base_dir}", *argv])
    refused(result, text)
    assert not base_dir.exists()  # nothing ran, nothing written


def test_switches_and_empty_knobs_are_refused_by_invoke_too(base_dir):
    invoke = os.path.join(os.path.dirname(sys.executable), "invoke")
    refused(run_cli([invoke, "pretrain", "--preset", ""]), "PRESET is empty")
    launch = [sys.executable, "-m", "backends.launch"]
    refused(run_cli([*launch, "pretrain", '{"dry_run": "maybe"}']), "DRY_RUN must be 1 or 0")


def test_make_n_prints_and_runs_nothing(base_dir):
    """The exit-code plumbing marks recipes to run even under -q; under -n they must not."""
    result = run_cli(["make", "-n", "pretrain", f"BASE_DIR={base_dir}"])
    assert result.returncode == 0, result.stderr
    assert "invoke pretrain --base-dir=" in result.stdout
    assert not base_dir.exists()


def test_a_depth_this_machine_cannot_hold_is_one_line_before_allocating(toy):
    result = run_cli(["make", "pretrain", f"BASE_DIR={toy}", "DEPTH=99999",
                      "ARGS=--dataset=toy --core-every=0"])  # fmt: skip
    line = refused(result, "depth 99999 needs at least")
    assert "TiB to train" in line and "choose a smaller DEPTH" in line
    assert not (toy / "base_checkpoints").exists()


# --- Exit codes through make ------------------------------------------------------------


def test_make_exits_1_when_the_stage_fails(base_dir):
    """A download that cannot reach its mirror failed (1): not bad input (2)."""
    result = run_cli(
        [
            "make",
            "download",
            "DATASET=climbmix",
            "SHARDS=1",
            "SOURCE=http://127.0.0.1:9/",
            f"BASE_DIR={base_dir}",
            "ARGS=--retries=1",
        ]  # fmt: skip
    )
    assert result.returncode == 1, result.stderr
    assert "Error" not in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_make_exits_128_plus_n_when_the_stage_is_stopped_by_signal_n(toy, sig):
    """As a script sees it: `make pretrain ...; echo $?` prints 143 (SIGTERM) or 130 (Ctrl-C,
    which make itself waits out, unlike SIGTERM)."""
    args = f"{' '.join(SMALL)} --num-steps=100000 --eval-every=0 --core-every=0"
    script = f"make pretrain BASE_DIR='{toy}' ARGS='{args}'; echo \"exit $?\""
    shell = subprocess.Popen(
        ["bash", "-c", script], cwd=REPO, env=cli_env({"OMP_NUM_THREADS": "1"}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = wait_for(lambda: holder_pid(toy), "the trainer to start")
    os.kill(pid, sig)  # the trainer alone: it saves, then exits 128 + sig
    out, err = shell.communicate(timeout=120)
    assert out.strip().splitlines()[-1] == f"exit {128 + sig}", err[-2000:]


@pytest.mark.parametrize(
    "flag", ["--port=99999", "--port=0", "--port=http", "--allowed-hosts=", "--allowed-hosts= ,"]
)
def test_a_server_flag_that_cannot_hold_is_one_line(base_dir, flag):
    result = run_cli([sys.executable, "-m", "scripts.chat_web", flag])
    refused(result, flag.partition("=")[0])
    assert not base_dir.exists()


def test_make_and_invoke_take_the_same_switch_words():
    """The Makefile checks switches itself (it turns them into bare flags): its words are
    those of backends/knobs.py, in every case make cannot fold."""
    from backends import knobs

    text = (REPO / "Makefile").read_text()
    for name, words in (("SWITCH_ON", knobs.SWITCH_ON), ("SWITCH_OFF", knobs.SWITCH_OFF)):
        line = next(x for x in text.splitlines() if x.startswith(f"{name} :="))
        in_make = set(line.partition(":=")[2].split())
        expected = {v for w in words if w for v in (w, w.capitalize(), w.upper())}
        assert in_make == expected, name
