"""Bad input: one clear line on stderr, exit code 2, nothing run and nothing written."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest
from conftest import run_cli

from backends.planning import plan
from nanochat.common import UsageError

BAD_KNOBS = [
    ({"depth": "abc"}, "DEPTH must be a positive integer, got 'abc'"),
    ({"depth": "0"}, "DEPTH must be a positive integer, got '0'"),
    ({"gpus": "-2"}, "GPUS must be a positive integer, got '-2'"),
    ({"shards": "1.5"}, "SHARDS must be a positive integer, got '1.5'"),
    ({"device_batch": "x"}, "DEVICE_BATCH must be a positive integer"),
    ({"backend": "nope"}, "unknown backend 'nope'; choose one of: local, docker, modal"),
    (
        {"preset": "huge"},
        "unknown preset 'huge'; choose one of: tiny, smoke, quick, speedrun, gpt2",
    ),
    ({"gpu": "H100:0"}, "GPU must look like H100:8"),
    ({"dataset": "../etc"}, "DATASET must be a lowercase name"),
    ({"args": "--x 'unclosed"}, "ARGS cannot be split like a shell line"),
    ({"nodes": "2"}, "NODES=2 needs NODE_RANK: this machine's index"),
    ({"nodes": "2", "node_rank": "0"}, "NODES=2 needs MASTER_ADDR: the address of node 0"),
    ({"nodes": "2", "node_rank": "2", "master_addr": "h"}, "NODE_RANK=2 is not below NODES=2"),
    ({"nodes": "2", "node_rank": "-1"}, "NODE_RANK must be 0 or a positive integer, got '-1'"),
    ({"node_rank": "1"}, "NODE_RANK applies only to a multi-node run: add NODES=2"),
    ({"master_addr": "h", "master_port": "1"}, "MASTER_ADDR, MASTER_PORT apply only to"),
    ({"nodes": "2", "master_port": "70000"}, "MASTER_PORT must be a TCP port, 1-65535"),
    ({"nodes": "2", "master_addr": "a b"}, "MASTER_ADDR must be a host name or an IPv4/IPv6"),
    (
        {"nodes": "2", "backend": "modal", "node_rank": "1"},
        "NODE_RANK and MASTER_ADDR are not for BACKEND=modal",
    ),
    (
        {"backend": "modal", "preset": "quick", "gpus": "8"},
        "GPUS=8 but only 4 GPU(s) are in the remote container (GPU=A100-80GB:4)",
    ),
]


@pytest.mark.parametrize("knobs,message", BAD_KNOBS, ids=[m for _, m in BAD_KNOBS])
def test_bad_knob_is_a_usage_error(knobs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan("pretrain", dry_run=True, **knobs)


def test_nodes_on_a_one_process_stage_is_a_usage_error():
    with pytest.raises(UsageError, match="stage 'tokenizer' runs as one process"):
        plan("tokenizer", dry_run=True, nodes="2", node_rank="0", master_addr="127.0.0.1")


def test_unknown_stage():
    with pytest.raises(
        UsageError, match="unknown stage 'bogus'; stages: download, task-data, tokenizer"
    ):
        plan("bogus")


def test_source_is_checked_per_stage(tmp_path):
    with pytest.raises(UsageError, match="SOURCE must be one of base, mid, sft, rl"):
        plan("sft", source="final", dry_run=True)
    with pytest.raises(UsageError, match="mirror URL or an existing folder"):
        plan("download", source=str(tmp_path / "missing"), dry_run=True)
    with pytest.raises(UsageError, match="which BACKEND=modal cannot see"):
        plan("download", source=str(tmp_path), backend="modal", dry_run=True)
    cmd = plan("download", source="http://127.0.0.1:9/data", dry_run=True).command
    assert "--source=http://127.0.0.1:9/data" in cmd.argv


def test_unwritable_base_dir_touches_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is not writable: .*a-file is not a directory"):
        plan("tokenizer", base_dir=str(blocker / "base"))
    assert blocker.read_text() == "x"
    if os.geteuid() != 0:  # root writes through permission bits, so this part needs a user
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(UsageError, match="denies writing"):
            plan("tokenizer", base_dir=str(locked / "base"))


def test_gpus_beyond_the_cpu_count_without_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UsageError, match="GPUS=4096 but no GPU is visible"):
        plan("pretrain", gpus="4096")
    cmd = plan("pretrain", gpus="4096", dry_run=True).command  # dry run works anywhere
    assert "--nproc_per_node=4096" in cmd.argv


def test_gpus_beyond_the_visible_gpus(tmp_path, monkeypatch):
    # Boundary stand-in: no GPU here, so a stub nvidia-smi lists two. The real one is
    # exercised on a GPU machine (device sessions), not in CI.
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UsageError, match="GPUS=8 but only 2 GPU"):
        plan("pretrain", gpus="8")
    cmd = plan("pretrain", preset="quick", dry_run=True).command
    assert "--nproc_per_node=2" in cmd.argv  # default beyond tiny: every visible GPU
    assert cmd.env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    cmd = plan("pretrain", preset="quick", dry_run=True).command
    assert cmd.argv[:3] == ["python", "-m", "scripts.base_train"]


def test_unbuilt_stage_fails_clearly(monkeypatch):
    """A row whose entry module is not written yet (every row has one today)."""
    from backends import stages

    unbuilt = dataclasses.replace(stages.STAGES_BY_NAME["rl"], module="scripts.not_written_yet")
    monkeypatch.setitem(stages.STAGES_BY_NAME, "rl", unbuilt)
    with pytest.raises(UsageError, match=r"stage 'rl' is not implemented yet"):
        plan("rl")
    assert plan("rl", dry_run=True).command.argv[-1] != ""  # a dry run still shows it


CLI_CASES = [
    (["invoke", "pretrain", "--depth", "abc"], "error: DEPTH must be a positive integer"),
    (["invoke", "pretrain", "--backend", "nope"], "error: unknown backend 'nope'"),
    (["invoke", "rl", "--source", "nope"], "error: SOURCE must be one of base, mid, sft, rl"),
    (["invoke", "download", "--shards", "0"], "error: SHARDS must be a positive integer"),
]


@pytest.mark.parametrize("argv,line", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_invoke_prints_one_line_and_exits_2(argv, line, base_dir):
    result = run_cli(argv)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(line)
    assert result.stdout == ""
    assert not base_dir.exists()


@pytest.mark.parametrize(
    "argv,line",
    [
        (["make", "pretrain", "DEPTH=abc"], "error: DEPTH must be a positive integer, got 'abc'"),
        (["make", "pretrain", "BACKEND=nope"], "error: unknown backend 'nope'"),
        (["make", "bogus"], "unknown target 'bogus': run 'make help'"),
    ],
)
def test_make_exits_2_with_the_clear_line_first(argv, line, base_dir):
    result = run_cli(argv)
    assert result.returncode == 2
    assert line in result.stderr.splitlines()[0]
    # make adds its own "make: *** [...] Error 2" trailer after our line, nothing else.
    assert len(result.stderr.splitlines()) <= 2
    assert not base_dir.exists()


RECIPE_CASES = [
    (
        ["scripts.base_train", "--window-pattern=SXL"],
        "argument --window-pattern: must be letters S",
    ),
    (
        ["scripts.base_train", "--weight-decay=-1"],
        "argument --weight-decay: expected a number >= 0",
    ),
    (["scripts.base_train", "--momentum=sawtooth"], "argument --momentum: invalid choice"),
    (["scripts.base_train", "--adam-betas=fancy"], "argument --adam-betas: invalid choice"),
    (["scripts.bench_train", "--window-pattern=X"], "argument --window-pattern: must be letters"),
    (["scripts.ablate", "--seeds", "0"], "argument --seeds: expected a positive integer"),
    (["scripts.ablate", "--depths", "4", "-1"], "argument --depths: expected a positive integer"),
    (["scripts.ablate", "--rows", "nonsense"], "argument --rows: invalid choice"),
]


@pytest.mark.parametrize("argv,line", RECIPE_CASES, ids=[" ".join(a) for a, _ in RECIPE_CASES])
def test_recipe_and_ablation_flags_fail_in_one_line_before_any_work(argv, line, base_dir):
    import sys

    result = run_cli([sys.executable, "-m", *argv])
    assert result.returncode == 2
    assert line in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not base_dir.exists()


def test_bench_tools_refuse_a_dry_run_that_is_neither_on_nor_off(base_dir):
    result = run_cli(["make", "--no-print-directory", "bench-engine", "DRY_RUN=maybe"])
    assert result.returncode == 2
    assert "DRY_RUN must be 1 or 0 (on or off), got 'maybe'" in result.stderr.splitlines()[0]
    assert not base_dir.exists()
