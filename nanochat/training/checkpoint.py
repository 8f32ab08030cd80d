"""Checkpoints that survive a kill at any moment, and the resume that finds the good one.

Layout, one folder per run tag, e.g. ``base_checkpoints/d12/``:

    model_000500.pt          model weights (rank 0 writes it)
    rank_000500_r0.pt        per rank: optimizer shard, data-loader position, RNG states
    meta_000500.json         step, configs, metrics, and the size + sha256 of every file

Every file is written to a temp name and renamed; ``meta_<step>.json`` is written last, after
all ranks finished theirs, so its presence means the checkpoint is whole. Across nodes that
may not see each other's files until they are committed (Modal volumes), the save is:
each rank writes its files and records their size and sha256 itself; the records are
gathered to rank 0 over the process group (no rank reads another's files), once each node has
committed its files (``commit_files``: a request to the Modal container's committer, nothing
elsewhere); rank 0 writes the meta from the records and commits it. A failure on any rank is
agreed on by all of them (no rank waits in a collective for one that gave up). A node lost
at any moment leaves no meta, or one whose files are all committed: complete or absent.
``latest`` walks the metas from the newest and returns the first whose files all exist with
the recorded size and hash: a checkpoint cut short by a kill (or damaged later) is reported
in one line and the previous one is used.
``start_point`` takes the tag's run lock (``nanochat.training.run_lock``: one run per tag at a
time), removes temp files a killed save left, and applies the stage's --resume policy; checkpoints
a fresh start must not pick up (they would be resumed, or loaded by the next stage, instead
of the new run's) are moved to ``<kind>_checkpoints/.replaced/<tag>-<time>/``, never deleted.
Damaged checkpoints newer than the one resumed are moved aside the same way
(``.replaced/<tag>-damaged-<time>/``), so they can never outrank, or make the pruning
delete, the run's good ones. ``save`` checks the free space first and keeps the newest
``KEEP_LAST`` complete checkpoints.
``find`` picks the checkpoint a later stage starts from or an eval or chat loads (newest complete
tag of a kind, or "auto": the most trained kind there is) and ``load_model`` rebuilds its GPT.
Used by every training stage (pretrain, midtrain, SFT, RL) and by the evals that load models.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.common import (
    CHECKPOINT_KINDS,
    COMMIT_DIR_ENV,
    DiskFullError,
    UsageError,
    atomic_path,
    atomic_write_text,
    check_free_space,
    file_sha256,
    log,
    one_line,
    sweep_temp_files,
)
from nanochat.training import run_lock

META = re.compile(r"^meta_(\d{6})\.json$")
STEP_OF_FILE = re.compile(r"^(?:model|rank)_(\d{6})(?:_r\d+)?\.pt$")
REPLACED = ".replaced"  # set-aside runs: a hidden folder, so neither resumed nor loaded
KEEP_LAST = 2  # complete checkpoints kept per run (older ones are deleted after a save)
KINDS = CHECKPOINT_KINDS  # base, mid, sft, rl
AUTO_ORDER = tuple(reversed(KINDS))  # "auto" takes the most trained kind available
MAKE_TARGET = {"base": "pretrain", "mid": "midtrain", "sft": "sft", "rl": "rl"}  # writes it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why in one line."""


def checkpoint_dir(base: Path, kind: str, tag: str) -> Path:
    """``base/<kind>_checkpoints/<tag>``, e.g. base/base_checkpoints/d12."""
    return kind_root(base, kind) / tag


def model_file(directory: Path, step: int) -> Path:
    return Path(directory) / f"model_{step:06d}.pt"


def rank_file(directory: Path, step: int, rank: int) -> Path:
    return Path(directory) / f"rank_{step:06d}_r{rank}.pt"


def meta_file(directory: Path, step: int) -> Path:
    return Path(directory) / f"meta_{step:06d}.json"


def _save_torch(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _tensor_bytes(obj: object) -> int:
    """The bytes of every tensor in a (nested) state dict: what torch.save will write,
    give or take a little pickle."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def bytes_needed(model_state: dict | None, rank_state: dict, writers_here: int = 1) -> int:
    """Room one save takes on this machine: the weights (rank 0) plus ``writers_here``
    ranks' own files, with 5% and 1 MiB to spare for pickle and the meta."""
    total = _tensor_bytes(model_state) + writers_here * _tensor_bytes(rank_state)
    return int(total * 1.05) + (1 << 20)


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
    agree: Callable[[bool], bool] = lambda flag: flag,
    collect: Callable[[object], list] = lambda obj: [obj],
) -> Path:
    """Write one checkpoint; every rank calls this (rank 0 passes the model state).

    ``barrier`` is torch.distributed.barrier under torchrun; ``agree(flag)`` is True on every
    rank when any rank says True (``runtime.all_agree``): a save that cannot fit on one
    rank's disk is refused on all of them, before any writes; ``collect(obj)`` is every
    rank's ``obj`` (``Runtime.collect``): rank 0 gets each rank's file records that way.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0 and model_state is None:
        raise ValueError("rank 0 must pass the model state")
    # Refuse a save that cannot fit before writing a byte: a checkpoint that dies half
    # written costs the space and the time. Ranks on one machine share its disk.
    writers_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if rank == 0 else 1
    needed = bytes_needed(model_state, rank_state, writers_here)
    refused = None
    try:
        check_free_space(model_file(directory, step), needed)
    except DiskFullError as exc:
        refused = exc
    if agree(refused is not None):
        raise refused or DiskFullError(model_file(directory, step), needed, "on another rank")
    mine = [rank_file(directory, step, rank)]
    records, failed = {}, None
    try:  # a rank that fails here must not leave the others waiting in a collective
        if rank == 0:
            _save_torch(model_state, model_file(directory, step))
            mine.insert(0, model_file(directory, step))
        _save_torch(rank_state, rank_file(directory, step, rank))
        records = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in mine}
        commit_files(f"step {step} rank {rank}")
    except (OSError, CheckpointError) as exc:
        failed = exc
    if agree(failed is not None):  # no meta: the step stays absent on every node
        raise failed or CheckpointError(f"the save of step {step} failed on another rank")
    every = collect(records)  # every node's files are written and committed
    keep_from = None
    if rank == 0:
        files = {name: record for ranks in every for name, record in ranks.items()}
        record = {**meta, "step": step, "world_size": world_size, "saved_at": time.time(),
                  "files": files}  # fmt: skip
        try:
            atomic_write_text(meta_file(directory, step), json.dumps(record, indent=2) + "\n")
            _completed.setdefault(directory.resolve(), set()).add(step)
            keep_from = _prune(directory, keep_last)
            commit_files(f"step {step} meta")
        except (OSError, CheckpointError) as exc:
            failed = exc
    if agree(failed is not None):
        raise failed or CheckpointError(f"rank 0 could not write the meta of step {step}")
    # Each rank deletes its own old files too: rank 0 may not see another node's.
    keep_from = collect(keep_from)[0]
    if keep_from is not None:
        for f in directory.glob(f"rank_*_r{rank}.pt"):
            found = STEP_OF_FILE.match(f.name)
            if found and int(found.group(1)) < keep_from:
                f.unlink(missing_ok=True)
    barrier()
    return meta_file(directory, step)


# --- committing files to shared storage (Modal volumes) ---------------------------------------

# Below the process group's own timeout (NCCL's default is 10 min), so a commit that hangs
# ends in this one line rather than in another rank's collective timing out.
COMMIT_TIMEOUT_S = 300.0


def commit_files(what: str, timeout_s: float = COMMIT_TIMEOUT_S) -> None:
    """Make this process's writes visible to other nodes before going on. Without
    $NANOCHAT_COMMIT_DIR (a local disk, NFS) there is nothing to do. On Modal the stage's
    container serves requests (``backends.modal_volumes.CheckpointCommitter``): this writes
    ``<id>.request`` there and waits for ``<id>.done`` (empty: committed; else the error)."""
    folder = os.environ.get(COMMIT_DIR_ENV)
    if not folder:
        return
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    request, done = Path(folder) / f"{token}.request", Path(folder) / f"{token}.done"
    atomic_write_text(request, what + "\n")
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise CheckpointError(f"the volume commit of {what} took over {timeout_s:.0f} s")
        time.sleep(0.05)
    error = done.read_text().strip()
    done.unlink(missing_ok=True)
    if error:
        raise CheckpointError(f"the volume commit of {what} failed: {error}")


def steps(directory: Path) -> list[int]:
    """Steps that have a meta file, newest first (complete or not: see ``verify``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [int(m.group(1)) for p in directory.iterdir() if (m := META.match(p.name))]
    return sorted(found, reverse=True)


def verify(directory: Path, step: int, check_hash: bool | str = True) -> dict:
    """The checkpoint's meta when every file is there with its recorded size and hash;
    otherwise a CheckpointError saying which file is wrong. ``check_hash``: True hashes every
    file, False none, "model" only the weights (what a loader of the model reads: the
    optimizer shards of every rank can be many times its size)."""
    path = meta_file(directory, step)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is unreadable ({exc})") from None
    model_name = model_file(directory, step).name
    for name, want in meta.get("files", {}).items():
        hashed = check_hash is True or (check_hash == "model" and name == model_name)
        check_file(Path(directory) / name, want, hashed)
    return meta


def check_file(f: Path, want: dict, hashed: bool = True) -> None:
    """CheckpointError unless ``f`` has its recorded size (and sha256, when ``hashed``)."""
    if not f.is_file():
        raise CheckpointError(f"{f.name} is missing")
    size = f.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"{f.name} has {size} bytes, expected {want['bytes']} (truncated?)")
    if hashed and file_sha256(f) != want["sha256"]:
        raise CheckpointError(f"{f.name} does not match its recorded sha256 (damaged)")


@dataclass(frozen=True)
class Found:
    directory: Path
    step: int
    meta: dict


def latest(directory: Path, check_hash: bool | str = True) -> Found | None:
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
    target = _replaced_target(directory, directory.name)
    directory.rename(target)
    return target


def start_point(
    directory: Path,
    policy: str,
    master: bool = True,
    barrier: Callable[[], None] = lambda: None,
    agree: Callable[[bool], bool] = lambda flag: flag,
    collect: Callable[[object], list] = lambda obj: [obj],
) -> Found | None:
    """The checkpoint a training run continues from under its --resume ``policy`` (every
    rank calls this; rank 0 takes the tag's run lock and moves folders, the others wait at
    ``barrier``; a lock held by another run stops every rank with UsageError, as decided
    by ``agree``, see ``save``). Rank 0 alone decides which step, and ``collect`` tells the
    others: their view of the folder may lag (another node, NFS caching), and every rank
    must resume the same step; a rank that cannot see it stops them all in one line.

    - ``auto``: the latest usable checkpoint of the tag, if any;
    - ``never``: none; the tag's checkpoints are set aside first, so the fresh run's own
      checkpoints are the only ones there (older, higher-step ones would otherwise be
      resumed, kept by the pruning, or loaded by the next stage);
    - ``since:T``: the latest one if it was saved at or after unix time T (this run's own
      progress, e.g. before a preemption), else as ``never``.

    Under ``auto`` and ``since:T``, damaged checkpoints newer than the usable one are set
    aside (``set_aside_steps``): never deleted, and never again in the way.
    """
    directory = Path(directory)
    found = None
    busy = None
    if master:
        try:
            run_lock.hold(directory)
        except UsageError as exc:  # another run holds the tag: every rank stops, before work
            busy = exc
    if agree(busy is not None):
        raise busy or UsageError("rank 0 could not take the checkpoint tag's lock")
    if master:
        for tmp in sweep_temp_files(directory):
            log(f"removed {tmp.name}, left by a save that was killed")
        if policy != "never":
            found = latest(directory)
            damaged = [s for s in steps(directory) if found is None or s > found.step]
            moved = set_aside_steps(directory, damaged, "damaged")
            if moved:
                log(f"moved the damaged checkpoint(s) {damaged} of {directory} to {moved}")
        if policy.startswith("since:"):
            if found is not None and found.meta.get("saved_at", 0) < float(policy[6:]):
                found = None
        if found is None and policy != "auto":
            moved = set_aside(directory)
            if moved:
                log(f"--resume={policy}: moved the earlier checkpoints of {directory} to {moved}")
    barrier()
    chosen = collect(found.step if found is not None else None)[0]
    if chosen is None:  # the same answer on every rank
        return None
    problem = None
    if not master:
        try:
            found = Found(directory, chosen, verify(directory, chosen, check_hash=False))
        except CheckpointError as exc:  # rank 0 has just checked the hashes; sizes here
            problem = exc
    if agree(problem is not None):  # every rank takes part, rank 0 too
        raise UsageError(
            f"rank 0 resumes step {chosen} of {directory}, which another node cannot use "
            f"({problem or 'see its log'}): every node must see the same BASE_DIR"
        )
    return found


def set_aside_steps(directory: Path, step_list: list[int], why: str) -> Path | None:
    """Move the files of these steps to ``../.replaced/<tag>-<why>-<time>/`` (renames:
    nothing is lost); the new folder, or None when there was nothing to move."""
    directory = Path(directory)
    files = [
        f
        for step in step_list
        for f in (
            meta_file(directory, step),
            model_file(directory, step),
            *directory.glob(f"rank_{step:06d}_r*.pt"),
        )  # fmt: skip
        if f.exists()
    ]
    if not files:
        return None
    target = _replaced_target(directory, f"{directory.name}-{why}")
    target.mkdir(parents=True)
    for f in files:
        f.rename(target / f.name)
    return target


def _replaced_target(directory: Path, stem: str) -> Path:
    root, stamp = Path(directory).parent / REPLACED, time.strftime("%Y%m%d-%H%M%S")
    target, n = root / f"{stem}-{stamp}", 2
    while target.exists():
        target, n = root / f"{stem}-{stamp}-{n}", n + 1
    root.mkdir(parents=True, exist_ok=True)
    return target


def load_model_state(found: Found, device: str | torch.device = "cpu") -> dict:
    return torch.load(model_file(found.directory, found.step), map_location=device)


def load_rank_state(
    found: Found, rank: int, device: str | torch.device = "cpu", check_hash: bool = False
) -> dict:
    """One rank's optimizer shard, data position and RNG states. ``check_hash``: check the
    file against its record first (``find`` hashed only the model file)."""
    if rank >= found.meta["world_size"]:
        raise CheckpointError(
            f"checkpoint step {found.step} was written by {found.meta['world_size']} "
            f"process(es): rank {rank} has no state there"
        )
    path = rank_file(found.directory, found.step, rank)
    recorded = found.meta.get("files", {}).get(path.name)
    if check_hash and recorded:
        check_file(path, recorded)
    return torch.load(path, map_location=device, weights_only=False)


# Steps this process saved whole: complete by construction, also where another node's files
# are not visible here (a Modal volume before the other node's commit is reloaded).
_completed: dict[Path, set[int]] = {}


def _prune(directory: Path, keep_last: int) -> int | None:
    """Keep the newest ``keep_last`` complete checkpoints and delete the older ones (their
    meta first), and older files of saves that never got a meta (killed mid-save: never a
    checkpoint, only space taken). Only complete ones count: a damaged one never takes a
    good one's place, and nothing newer than the oldest kept is touched (the next start
    sets damaged ones aside). Returns the oldest kept step (None: nothing pruned), below
    which the other ranks delete their own files."""
    good = []
    saved_here = _completed.get(Path(directory).resolve(), set())
    for step in steps(directory):
        try:
            if step not in saved_here:
                verify(directory, step, check_hash=False)
        except CheckpointError:
            continue
        good.append(step)
        if len(good) == keep_last:
            break
    if len(good) < keep_last:
        return None
    for step in steps(directory):
        if step < good[-1]:
            meta_file(directory, step).unlink(missing_ok=True)
    for f in Path(directory).glob("*.pt"):
        found = STEP_OF_FILE.match(f.name)
        if found and int(found.group(1)) < good[-1]:
            f.unlink(missing_ok=True)
    return good[-1]


# --- finding and loading the checkpoint a stage starts from ----------------------------------


def kind_root(base: Path, kind: str) -> Path:
    """``base/<kind>_checkpoints``: every tag of one kind."""
    return Path(base) / f"{kind}_checkpoints"


def _complete_tags(base: Path, kind: str) -> list[tuple[float, Path]]:
    """(mtime of the newest complete meta, folder) of each tag of a kind with a usable
    checkpoint. Sizes are checked here; the hash only for the one that gets loaded."""
    root = kind_root(base, kind)
    if not root.is_dir():
        return []
    tags = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found = latest(folder, check_hash=False)
        if found is not None:
            tags.append((meta_file(folder, found.step).stat().st_mtime, folder))
    return tags


def _has_tag(base: Path, kind: str, tag: str | None) -> bool:
    return any(tag is None or folder.name == tag for _, folder in _complete_tags(base, kind))


def find(
    base: Path,
    kind: str = "auto",
    tag: str | None = None,
    step: int | None = None,
    other_flag: str | None = "-i",
    others: tuple[str, ...] = KINDS,
) -> tuple[str, Found]:
    """(kind, Found) of the checkpoint whose model to load; UsageError naming the stage to
    run otherwise. Only the model file's hash is checked (the loader reads nothing else).

    ``kind`` is base | mid | sft | rl | auto (the first of rl, sft, mid, base with a
    checkpoint); ``tag`` defaults to the folder whose newest complete checkpoint is the most
    recent, ``step`` to its latest complete step. When there is none of ``kind`` but one of
    ``others`` (the kinds the caller accepts) exists, the error suggests
    ``<other_flag> <that kind>`` (``other_flag`` None: no suggestion)."""
    base = Path(base)
    if kind not in (*KINDS, "auto"):
        raise UsageError(f"unknown source {kind!r}; choose one of: {', '.join(KINDS)}, auto")
    if kind == "auto":
        kind = next((k for k in AUTO_ORDER if _has_tag(base, k, tag)), "")
        if not kind:
            where = "" if tag is None else f" with tag {tag!r}"
            raise UsageError(f"no model yet{where}: run `make pretrain` first")
    root = kind_root(base, kind)
    tags = _complete_tags(base, kind)
    fix = f"run `make {MAKE_TARGET[kind]}` first"
    if not tags:
        there = [k for k in AUTO_ORDER if k != kind and k in others and _has_tag(base, k, None)]
        hint = f" (or {other_flag} {there[0]})" if there and other_flag else ""
        raise UsageError(f"no {kind} checkpoint under {root}: {fix}{hint}")
    if tag is None:
        directory = max(tags)[1]
    else:
        directory = checkpoint_dir(base, kind, tag)
        if directory not in [folder for _, folder in tags]:
            have = ", ".join(folder.name for _, folder in tags)
            raise UsageError(f"no complete {kind} checkpoint in {directory} (tags: {have})")
    if step is None:
        found = latest(directory, check_hash="model")
        if found is None:
            raise UsageError(f"no usable checkpoint in {directory}: {fix} (or pick another --tag)")
        return kind, found
    available = steps(directory)
    if step not in available:
        have = ", ".join(map(str, available)) or "none"
        raise UsageError(f"no checkpoint of step {step} in {directory} (steps: {have})")
    try:
        return kind, Found(directory, step, verify(directory, step, check_hash="model"))
    except CheckpointError as exc:
        raise UsageError(f"checkpoint step {step} in {directory} is not usable: {exc}") from None


def inherited(name: str, given, saved: dict, default, say: bool):
    """A setting from the command line (``given``), else from the run config of the checkpoint
    a stage starts from (``saved``), else ``default``; ``say`` logs which and why."""
    if given is not None:
        if say and saved.get(name) not in (None, given):
            log(f"overriding {name}: {saved[name]} (checkpoint) -> {given}")
        return given
    if name in saved:
        if say:
            log(f"inherited {name} {saved[name]} from the checkpoint")
        return saved[name]
    return default


def model_config(found: Found, vocab_size: int | None = None):
    """The checkpoint's GPTConfig, checked: a meta that does not describe a model, or a
    vocabulary other than the tokenizer's (``vocab_size``), is a one-line UsageError. Cheap:
    callers check it before any heavy work."""
    from nanochat.model.gpt import GPTConfig

    where = f"{found.directory} step {found.step}"
    saved = found.meta.get("model_config")
    if not isinstance(saved, dict):
        raise UsageError(f"the meta of {where} has no model_config")
    try:
        config = GPTConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the model_config of {where} is not valid: {one_line(exc)}") from None
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise UsageError(
            f"{where} has a vocabulary of {config.vocab_size}, the tokenizer "
            f"{vocab_size}: was the tokenizer retrained after pretraining?"
        )
    return config


def load_model(found: Found, device, vocab_size: int | None = None):
    """The GPT of a checkpoint, rebuilt from its meta (``model_config``), in eval mode on
    ``device``."""
    from nanochat.model.gpt import build_model

    where = f"{found.directory} step {found.step}"
    model = build_model(model_config(found, vocab_size), device)
    state = load_model_state(found, device)
    # A model saved through torch.compile carries the wrapper's prefix.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{where} does not fit its model_config: {one_line(exc)}") from None
    model.eval()
    return model
