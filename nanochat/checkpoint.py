"""Checkpoints that survive a kill at any moment, and the resume that finds the good one.

Layout (DESIGN A.4), one folder per run tag, e.g. ``base_checkpoints/d12/``:

    model_000500.pt          model weights (rank 0 writes it)
    rank_000500_r0.pt        per rank: optimizer shard, data-loader position, RNG states
    meta_000500.json         step, configs, metrics, and the size + sha256 of every file

Every file is written to a temp name and renamed; ``meta_<step>.json`` is written last, after
all ranks finished theirs, so its presence means the checkpoint is whole (the Modal backend
commits its volume when one appears). ``latest`` walks the metas from the newest and returns
the first whose files all exist with the recorded size and hash: a checkpoint cut short by a
kill (or damaged later) is reported in one line and the previous one is used.
``start_point`` applies a stage's --resume policy; checkpoints a fresh start must not pick up
(they would be resumed, or loaded by the next stage, instead of the new run's) are moved to
``<kind>_checkpoints/.replaced/<tag>-<time>/``, never deleted.
Used by every training stage (pretrain, midtrain, SFT, RL) and by the evals that load models.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.common import atomic_path, atomic_write_text, log

META = re.compile(r"^meta_(\d{6})\.json$")
REPLACED = ".replaced"  # set-aside runs: a hidden folder, so neither resumed nor loaded
KEEP_LAST = 2  # complete checkpoints kept per run (older ones are deleted after a save)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why in one line."""


def checkpoint_dir(base: Path, kind: str, tag: str) -> Path:
    """``base/<kind>_checkpoints/<tag>``, e.g. base/base_checkpoints/d12."""
    return Path(base) / f"{kind}_checkpoints" / tag


def model_file(directory: Path, step: int) -> Path:
    return Path(directory) / f"model_{step:06d}.pt"


def rank_file(directory: Path, step: int, rank: int) -> Path:
    return Path(directory) / f"rank_{step:06d}_r{rank}.pt"


def meta_file(directory: Path, step: int) -> Path:
    return Path(directory) / f"meta_{step:06d}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_torch(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save(
    directory: Path,
    step: int,
    model_state: dict | None,
    rank_state: dict,
    meta: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = KEEP_LAST,
) -> Path:
    """Write one checkpoint; every rank calls this (rank 0 passes the model state).

    ``barrier`` is torch.distributed.barrier under torchrun: rank 0 writes the meta only
    after every rank has written its own file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass the model state")
        _save_torch(model_state, model_file(directory, step))
    _save_torch(rank_state, rank_file(directory, step, rank))
    barrier()
    if rank == 0:
        files = [model_file(directory, step)] + [
            rank_file(directory, step, r) for r in range(world_size)
        ]
        record = {
            **meta,
            "step": step,
            "world_size": world_size,
            "saved_at": time.time(),
            "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
        }
        atomic_write_text(meta_file(directory, step), json.dumps(record, indent=2) + "\n")
        _prune(directory, keep_last)
    barrier()
    return meta_file(directory, step)


def steps(directory: Path) -> list[int]:
    """Steps that have a meta file, newest first (complete or not: see ``verify``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [int(m.group(1)) for p in directory.iterdir() if (m := META.match(p.name))]
    return sorted(found, reverse=True)


def verify(directory: Path, step: int, check_hash: bool = True) -> dict:
    """The checkpoint's meta when every file is there with its recorded size (and hash);
    otherwise a CheckpointError saying which file is wrong."""
    path = meta_file(directory, step)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is unreadable ({exc})") from None
    for name, want in meta.get("files", {}).items():
        f = Path(directory) / name
        if not f.is_file():
            raise CheckpointError(f"{name} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, expected {want['bytes']} (truncated?)")
        if check_hash and _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{name} does not match its recorded sha256 (damaged)")
    return meta


@dataclass(frozen=True)
class Found:
    directory: Path
    step: int
    meta: dict


def latest(directory: Path, check_hash: bool = True) -> Found | None:
    """The newest usable checkpoint, or None. Damaged ones are reported and skipped."""
    for step in steps(directory):
        try:
            return Found(Path(directory), step, verify(directory, step, check_hash))
        except CheckpointError as exc:
            log(f"checkpoint step {step} in {directory} is not usable: {exc}; trying an older one")
    return None


def set_aside(directory: Path) -> Path | None:
    """Move a tag's folder to ``../.replaced/<tag>-<time>/`` (a rename: nothing is lost);
    the new location, or None when there was nothing to move."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.iterdir()):
        return None
    root, stamp = directory.parent / REPLACED, time.strftime("%Y%m%d-%H%M%S")
    target, n = root / f"{directory.name}-{stamp}", 2
    while target.exists():
        target, n = root / f"{directory.name}-{stamp}-{n}", n + 1
    root.mkdir(parents=True, exist_ok=True)
    directory.rename(target)
    return target


def start_point(
    directory: Path, policy: str, master: bool = True, barrier: Callable[[], None] = lambda: None
) -> Found | None:
    """The checkpoint a training run continues from under its --resume ``policy`` (every
    rank calls this; rank 0 moves folders, the others wait at ``barrier``):

    - ``auto``: the latest usable checkpoint of the tag, if any;
    - ``never``: none; the tag's checkpoints are set aside first, so the fresh run's own
      checkpoints are the only ones there (older, higher-step ones would otherwise be
      resumed, kept by the pruning, or loaded by the next stage);
    - ``since:T``: the latest one if it was saved at or after unix time T (this run's own
      progress, e.g. before a preemption), else as ``never``.
    """
    if policy == "auto":
        return latest(directory)
    if master:
        found = latest(directory, check_hash=False) if policy.startswith("since:") else None
        fresh = found is not None and found.meta.get("saved_at", 0) >= float(policy[6:])
        moved = None if fresh else set_aside(directory)
        if moved:
            log(f"--resume={policy}: moved the earlier checkpoints of {directory} to {moved}")
    barrier()
    return None if policy == "never" else latest(directory)


def load_model_state(found: Found, device: str | torch.device = "cpu") -> dict:
    return torch.load(model_file(found.directory, found.step), map_location=device)


def load_rank_state(found: Found, rank: int, device: str | torch.device = "cpu") -> dict:
    if rank >= found.meta["world_size"]:
        raise CheckpointError(
            f"checkpoint step {found.step} was written by {found.meta['world_size']} process(es); "
            f"resume with the same GPUS (rank {rank} has no state)"
        )
    return torch.load(
        rank_file(found.directory, found.step, rank), map_location=device, weights_only=False
    )


def _prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (their meta first)."""
    for step in steps(directory)[keep_last:]:
        meta_file(directory, step).unlink(missing_ok=True)
        model_file(directory, step).unlink(missing_ok=True)
        for f in Path(directory).glob(f"rank_{step:06d}_r*.pt"):
            f.unlink(missing_ok=True)
