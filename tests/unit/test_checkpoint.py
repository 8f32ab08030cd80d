"""Checkpoints: atomic files, meta last, damaged ones skipped with one line, pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO

from nanochat.training import checkpoint


def weights(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=gen), "b": torch.randn(64, generator=gen)}


def save_step(directory, step, world_size=1, **meta):
    for rank in reversed(range(world_size)):  # rank 0 last: it writes the meta
        checkpoint.save(
            directory,
            step,
            weights(step) if rank == 0 else None,
            {"optimizer": {"rank": rank, "step": step}, "loader": {"cursor": step}},
            {"model_config": {"depth": 4}, **meta},
            rank=rank,
            world_size=world_size,
        )


def test_round_trip_and_layout(tmp_path):
    directory = checkpoint.checkpoint_dir(tmp_path, "base", "d4")
    save_step(directory, 10, world_size=2, val_bpb=1.5)
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "meta_000010.json",
        "model_000010.pt",
        "rank_000010_r0.pt",
        "rank_000010_r1.pt",
    ]
    found = checkpoint.latest(directory)
    assert found.step == 10 and found.meta["val_bpb"] == 1.5 and found.meta["world_size"] == 2
    state = checkpoint.load_model_state(found)
    assert torch.equal(state["w"], weights(10)["w"])
    assert checkpoint.load_rank_state(found, 1)["optimizer"] == {"rank": 1, "step": 10}
    with pytest.raises(checkpoint.CheckpointError, match="written by 2 process"):
        checkpoint.load_rank_state(found, 2)


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.latest(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "bad-meta"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys, damage):
    save_step(tmp_path, 5)
    save_step(tmp_path, 10)
    model = checkpoint.model_file(tmp_path, 10)
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "delete":
        checkpoint.rank_file(tmp_path, 10, 0).unlink()
    else:
        checkpoint.meta_file(tmp_path, 10).write_text("{not json")
    found = checkpoint.latest(tmp_path)
    assert found.step == 5
    err = capsys.readouterr().err
    assert "checkpoint step 10" in err and "trying an older one" in err
    assert len(err.strip().splitlines()) == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step)
    assert checkpoint.steps(tmp_path) == [4, 3]
    assert not checkpoint.model_file(tmp_path, 2).exists()
    assert not list(tmp_path.glob("rank_000001_*"))


def test_meta_records_sizes_and_hashes(tmp_path):
    save_step(tmp_path, 7)
    meta = json.loads(checkpoint.meta_file(tmp_path, 7).read_text())
    model = checkpoint.model_file(tmp_path, 7)
    assert meta["files"]["model_000007.pt"]["bytes"] == model.stat().st_size
    assert len(meta["files"]["model_000007.pt"]["sha256"]) == 64


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    """A real SIGKILL while a large checkpoint is being written: the earlier one survives."""
    save_step(tmp_path, 1)
    writer = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from nanochat.training import checkpoint
        big = {{"w": torch.randn(4096, 4096)}}  # 64 MiB: the kill lands mid-write
        print("writing", flush=True)
        while True:
            checkpoint.save({str(tmp_path)!r}, 2, big, {{"x": 1}}, {{}})
            checkpoint.save({str(tmp_path)!r}, 3, big, {{"x": 1}}, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = checkpoint.latest(tmp_path)
    assert found is not None and found.step in (1, 2, 3)
    assert checkpoint.load_model_state(found)  # whatever is latest loads
    if found.step == 1:
        assert torch.equal(checkpoint.load_model_state(found)["w"], weights(1)["w"])


def test_starting_over_sets_the_old_run_aside_and_since_keeps_its_own_progress(tmp_path):
    """--resume=never: an older run's checkpoints (higher steps) are moved aside, never
    deleted, so they are neither resumed, nor kept by the pruning over the new ones, nor
    loaded by the next stage. since:T resumes only what was saved from T on."""
    run = tmp_path / "sft_checkpoints" / "d4"
    for step in (400, 500):
        save_step(run, step)
    assert checkpoint.start_point(run, "auto").step == 500
    assert checkpoint.start_point(run, "never") is None
    assert not run.exists()
    (aside,) = (tmp_path / "sft_checkpoints" / checkpoint.REPLACED).iterdir()
    assert checkpoint.steps(aside) == [500, 400]  # all there, untouched
    save_step(run, 10)  # the new run's first checkpoint
    assert checkpoint.steps(run) == [10]
    # A retry of the same forced attempt (since: when it began) continues from step 10 ...
    began = checkpoint.latest(run).meta["saved_at"] - 1
    assert checkpoint.start_point(run, f"since:{began:.0f}").step == 10
    # ... while a forced run that began later sets step 10 aside as well.
    assert checkpoint.start_point(run, f"since:{time.time() + 60:.0f}") is None
    assert len(list((tmp_path / "sft_checkpoints" / checkpoint.REPLACED).iterdir())) == 2


def test_the_resume_flag_accepts_only_its_three_forms():
    from nanochat.common import resume_policy

    assert [resume_policy(v) for v in ("auto", "never", "since:1700000000")] == [
        "auto", "never", "since:1700000000"
    ]  # fmt: skip
    for bad in ("sometimes", "since:", "since:-5", "since:x"):
        with pytest.raises(Exception, match="expected auto, never or since"):
            resume_policy(bad)
