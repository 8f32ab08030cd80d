"""One speedrun at a time per set of Modal volumes: a lease in a ``modal.Dict``.

Part of the launcher (tasks.py -> backends -> scripts): ``backends/modal_app.py``'s
``speedrun_remote`` takes the lease before it runs the stages in order (data -> tokenizer ->
pretrain -> eval -> midtrain -> SFT -> RL -> report) and renews it while they run, so two
orchestrators never write the same checkpoints. Imports no torch and needs no Modal token to
import.
"""

from __future__ import annotations

import threading
import time

import modal

LOCK_DICT = "nanochat-locks"  # a modal.Dict beside the volumes
LOCK_KEY = "speedrun"
LEASE_S = 600.0  # a lease not renewed for this long belongs to a dead orchestrator
RENEW_S = 60.0


class SpeedrunBusy(RuntimeError):
    """Another orchestrator holds the lease on these volumes."""


def lease_holder(store, now: float | None = None) -> dict | None:
    """The live lease on the volumes ({"owner", "since", "expires"}), or None."""
    held = store.get(LOCK_KEY)
    now = time.time() if now is None else now
    return held if held and float(held.get("expires", 0)) > now else None


class SpeedrunLease:
    """A lease in a ``modal.Dict`` (``store``): one speedrun orchestrator per set of volumes.

    Taken with Dict.put(skip_if_exists=True), which the server applies atomically; a lease
    whose holder stopped renewing it (a crash, ``modal app stop``) is stale after LEASE_S
    and may be taken over. The owner is the function call id, which Modal keeps when it
    retries the same call: a retried orchestrator takes its own lease back."""

    def __init__(self, store, owner: str, clock=time.time, lease_s: float = LEASE_S):
        self.store, self.owner, self.clock, self.lease_s = store, owner, clock, lease_s
        self.since = clock()
        self.stopped = threading.Event()
        self.lost = threading.Event()  # another orchestrator holds it now: stop

    def _record(self) -> dict:
        return {"owner": self.owner, "since": self.since, "expires": self.clock() + self.lease_s}

    def acquire(self) -> None:
        if self.store.put(LOCK_KEY, self._record(), skip_if_exists=True):
            return
        held = lease_holder(self.store, self.clock())
        if held and held.get("owner") != self.owner:
            raise SpeedrunBusy(busy_message(held, self.clock()))
        self.store.put(LOCK_KEY, self._record())  # stale, or ours from before a retry
        if self.store.get(LOCK_KEY, {}).get("owner") != self.owner:  # lost a takeover race
            raise SpeedrunBusy(busy_message(self.store.get(LOCK_KEY), self.clock()))

    def renew(self) -> None:
        held = self.store.get(LOCK_KEY)
        if held and held.get("owner") != self.owner:
            raise SpeedrunBusy("the speedrun lease was taken over: " + busy_message(held))
        self.store.put(LOCK_KEY, self._record())

    def keep_renewing(self, every_s: float = RENEW_S) -> threading.Thread:
        def loop() -> None:
            while not self.stopped.wait(every_s):
                try:
                    self.renew()
                except SpeedrunBusy as exc:
                    print(f"[nanochat] speedrun: {exc}; this one stops before its next stage")
                    self.lost.set()
                    return
                except Exception as exc:  # a hiccup of the Dict service: try again later
                    print(f"[nanochat] speedrun: could not renew the lease: {exc}")

        thread = threading.Thread(target=loop, daemon=True, name="speedrun-lease")
        thread.start()
        return thread

    def release(self) -> None:
        self.stopped.set()
        release_lease(self.store, self.owner)


def release_lease(store, owner: str) -> None:
    """Free the lease if ``owner`` holds it (never another orchestrator's)."""
    held = store.get(LOCK_KEY)
    if held and held.get("owner") == owner:
        store.pop(LOCK_KEY, None)


def busy_message(held: dict | None, now: float | None = None) -> str:
    held = held or {}
    minutes = ((time.time() if now is None else now) - float(held.get("since", 0))) / 60
    return (
        f"another speedrun is running on these volumes (call {held.get('owner')}, started "
        f"{minutes:.0f} min ago): wait for it, or stop its app (`modal app list`, then "
        f"`modal app stop <id>`); its lease lapses {LEASE_S / 60:.0f} min after it dies"
    )


def lock_store():
    """The Dict that holds the lease (created on first use, like the volumes)."""
    return modal.Dict.from_name(LOCK_DICT, create_if_missing=True)
