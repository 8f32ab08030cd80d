"""Where BASE_DIR lives on Modal: two volumes, what each holds, BASE_DIR as links into them.

Part of the launcher (tasks.py -> backends -> scripts): ``backends/modal_app.py`` runs every
stage of the pipeline (data -> tokenizer -> pretrain -> eval -> midtrain -> SFT -> RL ->
chat/serve) in a Modal container with these volumes mounted under ``/vol`` and imports this
module there too (it is in the image like the rest of the source).

BASE_DIR (``/data/nanochat``, as in the image) is made of symlinks into the volumes, so
every path a stage uses is the same as on a laptop. ``nanochat-data`` keeps what is
downloaded or derived from the corpus (shards, tokenizer, eval bundle, task data);
``nanochat-checkpoints`` keeps what training produces (checkpoints, reports, logs, exports).
Volumes are committed whenever a new checkpoint appears and when the stage ends, so a
preempted and retried stage resumes from its latest checkpoint.

Imports no torch and needs no Modal token to import.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import modal

from backends.modal_names import CHECKPOINT_VOLUME, DATA_VOLUME
from nanochat.common import CHECKPOINT_KINDS
from nanochat.export import EXPORT_DIR

VOLUME_ROOT_ENV = "NANOCHAT_VOLUME_ROOT"  # where the volumes are mounted (tests: a temp dir)
VOLUME_ROOT = "/vol"
# Volume name -> the top-level BASE_DIR entries it holds. Every artifact a stage reads or
# writes must be listed (tests/e2e/test_modal_app.py checks this against the stage table).
VOLUMES: dict[str, tuple[str, ...]] = {
    DATA_VOLUME: ("base_data", "tokenizer", "eval_bundle", "task_data"),
    CHECKPOINT_VOLUME: (
        *(f"{kind}_checkpoints" for kind in CHECKPOINT_KINDS),
        "report",
        "logs",
        EXPORT_DIR,
    ),
}
COMMIT_POLL_S = 30.0  # how often the committer looks for a new checkpoint (seconds)


def volume_of(entry: str) -> str:
    """The volume holding a top-level BASE_DIR entry (``base_checkpoints`` -> its volume)."""
    for name, entries in VOLUMES.items():
        if entry in entries:
            return name
    raise KeyError(entry)


# The volumes (created on first use) and where the functions mount them.
volumes = {name: modal.Volume.from_name(name, create_if_missing=True) for name in VOLUMES}
VOLUME_MOUNTS = {f"{VOLUME_ROOT}/{name}": vol for name, vol in volumes.items()}


def link_base_dir(base: Path, volume_root: Path) -> None:
    """Make BASE_DIR's top-level entries symlinks into the volumes (idempotent)."""
    base.mkdir(parents=True, exist_ok=True)
    for name, entries in VOLUMES.items():
        for entry in entries:
            target = volume_root / name / entry
            target.mkdir(parents=True, exist_ok=True)
            link = base / entry
            if link.is_symlink() and link.resolve() == target.resolve():
                continue
            if link.exists() or link.is_symlink():
                raise RuntimeError(f"{link} exists and is not a link to the volume {name}")
            link.symlink_to(target, target_is_directory=True)


def unpersisted(base: Path) -> list[str]:
    """Top-level BASE_DIR entries that are not on a volume (they die with the container)."""
    return sorted(p.name for p in base.iterdir() if not p.is_symlink()) if base.is_dir() else []


def commit_volumes(names=tuple(VOLUMES)) -> None:
    """Persist the volumes' changes; outside a Modal container (tests) there is nothing to do."""
    if modal.is_local():
        return
    for name in names:
        volumes[name].commit()


def _checkpoint_files(base: Path) -> set[str]:
    found = set()
    for entry in VOLUMES[CHECKPOINT_VOLUME]:
        if entry.endswith("_checkpoints") and (base / entry).is_dir():
            found |= {str(p) for p in (base / entry).rglob("meta_*.json")}
    return found


class CheckpointCommitter(threading.Thread):
    """Commits the checkpoint volume each time a new checkpoint is complete: a checkpoint's
    meta_<step>.json is written last, so its appearance means the checkpoint is whole.

    With ``requests`` (a folder outside the volumes, $NANOCHAT_COMMIT_DIR of the stage's
    processes) it also serves the checkpoint's commit requests
    (``nanochat.training.checkpoint.commit_files``) within a fraction of a second: each
    ``<id>.request`` is answered, after one commit for all of those pending, by
    ``<id>.done``, empty, or the commit's error. On several nodes every node commits its own
    ranks' files this way before rank 0 writes the meta."""

    def __init__(
        self,
        base: Path,
        commit=commit_volumes,
        poll_s: float = COMMIT_POLL_S,
        requests: Path | None = None,
        request_poll_s: float = 0.1,
    ):
        super().__init__(daemon=True, name="checkpoint-committer")
        self.base, self.commit, self.poll_s = base, commit, poll_s
        self.requests, self.request_poll_s = requests, request_poll_s
        self.seen = _checkpoint_files(base)
        self.stopped = threading.Event()
        self.commits = 0

    def run(self) -> None:
        next_check = time.monotonic() + self.poll_s
        wait = self.request_poll_s if self.requests else self.poll_s
        while not self.stopped.wait(wait):
            self.serve_requests()
            if time.monotonic() >= next_check:
                self.check()
                next_check = time.monotonic() + self.poll_s

    def check(self) -> None:
        now = _checkpoint_files(self.base)
        if now - self.seen:
            try:
                self.commit((CHECKPOINT_VOLUME,))
            except Exception as exc:  # the thread must live on: the next poll tries again
                print(f"[nanochat] modal: warning: the volume commit failed ({exc}); retrying")
                return
            self.commits += 1
            print(f"[nanochat] modal: committed {len(now - self.seen)} new checkpoint(s)")
        self.seen = now

    def serve_requests(self) -> int:
        """Answer the pending commit requests with one commit; how many were answered."""
        if self.requests is None:
            return 0
        pending = sorted(self.requests.glob("*.request"))
        if not pending:
            return 0
        error = ""
        try:
            self.commit((CHECKPOINT_VOLUME,))
            self.commits += 1
            self.seen = _checkpoint_files(self.base)  # the poll need not commit them again
        except Exception as exc:  # the stage's rank reports it and fails the save
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        for request in pending:
            done = request.with_suffix(".done")
            tmp = done.with_name(done.name + ".tmp")
            tmp.write_text(error)
            tmp.rename(done)
            request.unlink(missing_ok=True)
        return len(pending)

    def stop(self) -> None:
        self.stopped.set()
