"""Fault class "disk": a full disk at every write a run makes ends in one line naming the
path and the free space (exit 1), loses nothing already saved, and leaves no temp files;
a save that cannot fit is refused before a byte is written; temp files a killed save left
are swept at the next start. The disk is a real tmpfs of a few MiB, mounted per test."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, toy_texts, write_corpus
from helpers.pretrain import SMALL, lock_of, train

from nanochat import common
from nanochat.training import checkpoint, train_loop

RUN = [*SMALL, "--num-steps=100000", "--eval-every=0", "--core-every=0", "--sample-every=0"]


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: a disk the test can fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the full-disk faults were not run")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): not run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the disk's free space with one file (a process writing
    there meanwhile shrinks what is left: the filler takes what it can)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size = 0
        for _ in range(20):
            take = shutil.disk_usage(disk).free - leave
            if take <= 0:
                break
            try:
                os.posix_fallocate(fd, size, take)
                size += take
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def toy_on(disk: Path) -> Path:
    base = disk / "base"
    write_corpus(base, toy_texts())
    return base


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{common.TEMP_SUFFIX}"))


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(small_disk):
    base = toy_on(small_disk)
    env = {"NANOCHAT_BASE_DIR": str(base)}
    assert train([*RUN, "--stop-at=2"], env=env).returncode == 0
    folder = checkpoint.checkpoint_dir(base, "base", "d2")
    fill(small_disk, leave=256 << 10)
    result = train([*RUN, "--save-every=2"], env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device to write ")
    assert "model_000004.pt" in last and "KiB free there, about" in last and "needed" in last
    assert "Traceback" not in result.stderr
    assert checkpoint.latest(folder).step == 2  # the good checkpoint is whole
    assert not checkpoint.model_file(folder, 4).exists() and temp_files(base) == []


def test_a_disk_filling_up_during_a_run_ends_in_one_line(small_disk):
    """Whatever write meets the full disk first (the step log, a save) says so in one line."""
    base = toy_on(small_disk)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.base_train", *RUN, "--save-every=4"],
        cwd=REPO,
        env=cli_env({"NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step 00003/"):
                break
        fill(small_disk, leave=0)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: no space left on the device to write ")
    assert temp_files(base) == []


def test_a_save_cut_short_by_the_disk_is_one_error_and_no_temp_file(small_disk):
    """torch.save reports ENOSPC as 'basic_ios::clear': still a DiskFullError naming the file."""
    fill(small_disk, leave=1 << 20)
    target = small_disk / "model.pt"
    with pytest.raises(common.DiskFullError, match=r"model\.pt \(0 B free there\)"):
        with common.atomic_path(target) as tmp:
            torch.save(torch.zeros(4 << 20), tmp)  # 16 MiB into 1 MiB
    assert not target.exists() and temp_files(small_disk) == []


def test_a_log_rewrite_on_a_full_disk_keeps_the_old_log(small_disk):
    log_path = small_disk / "logs" / "pretrain-d2.jsonl"
    log_path.parent.mkdir()
    lines = [json.dumps({"step": i, "loss": 1.0}) for i in range(1, 3000)]
    log_path.write_text("\n".join(lines) + "\n")
    fill(small_disk, leave=0)
    with pytest.raises(common.DiskFullError, match="pretrain-d2.jsonl"):
        train_loop.keep_log_until(log_path, 1000)
    assert log_path.read_text().splitlines() == lines
    assert temp_files(small_disk) == []


def test_temp_files_of_a_killed_save_are_swept_at_the_next_start(toy):
    folder = checkpoint.checkpoint_dir(toy, "base", "d2")
    folder.mkdir(parents=True)
    stale = [folder / ".model_000002.pt.k3j4.tmp", folder / ".rank_000002_r0.pt.x9.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * (1 << 20))  # what SIGKILL during torch.save leaves
    log_tmp = toy / "logs" / ".pretrain-d2.jsonl.a1.tmp"
    log_tmp.parent.mkdir(parents=True)
    log_tmp.write_text("{}")
    result = train([*RUN, "--stop-at=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed .model_000002.pt.k3j4.tmp, left by a save that was killed" in result.stderr
    assert not any(p.exists() for p in [*stale, log_tmp])


def test_converting_documents_onto_a_full_disk_is_one_line(small_disk, tmp_path):
    """pyarrow's ENOSPC while writing a shard: one line, exit 1, no temp file, and the rerun
    after freeing space finishes the job."""
    import random
    import string

    source = tmp_path / "docs"
    source.mkdir()
    rng = random.Random(0)
    for i in range(4):  # random letters: parquet cannot compress them below the free space
        docs = ("".join(rng.choices(string.ascii_letters + " ", k=1000)) for _ in range(3000))
        (source / f"doc{i}.txt").write_text("\n\n".join(docs))
    filler = fill(small_disk, leave=8 << 20)
    base = small_disk / "base"
    argv = [sys.executable, "-m", "scripts.download", "--dataset=mydocs", f"--source={source}"]
    env = cli_env({"NANOCHAT_BASE_DIR": str(base)})
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device to write ") and ".parquet" in last
    assert "Traceback" not in result.stderr and temp_files(base) == []
    filler.unlink()
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def test_files_of_a_save_killed_before_its_meta_are_pruned_with_the_old_ones(toy):
    """model/rank files without a meta never were a checkpoint: once two newer complete ones
    exist they go with the pruning, instead of holding their space forever."""
    folder = checkpoint.checkpoint_dir(toy, "base", "d2")
    folder.mkdir(parents=True)
    leftovers = [checkpoint.model_file(folder, 1), checkpoint.rank_file(folder, 1, 0)]
    for path in leftovers:
        path.write_bytes(b"\0" * 1024)
    result = train([*RUN, "--num-steps=6", "--save-every=2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint.steps(folder) == [6, 4]
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "model_000004.pt", "model_000006.pt", "rank_000004_r0.pt", "rank_000006_r0.pt"]  # fmt: skip


def test_a_run_lock_that_cannot_be_written_leaves_no_empty_lock_behind(small_disk):
    from nanochat.training import run_lock

    folder = small_disk / "base" / "base_checkpoints" / "d2"
    folder.parent.mkdir(parents=True)
    fill(small_disk, leave=0)
    lock = run_lock.RunLock(folder)
    with pytest.raises(common.DiskFullError, match=r"\.d2\.lock"):
        lock.acquire()
    assert not lock.path.exists()  # an empty one would refuse the rerun


def test_an_empty_lock_left_by_a_killed_start_is_taken_over(toy):
    lock = lock_of(toy)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")  # killed between creating the file and writing its record
    os.utime(lock, (0, 0))
    result = train([*RUN, "--stop-at=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "took over the lock on d2 held by an unreadable lock file" in result.stderr
