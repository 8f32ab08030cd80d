"""make speedrun BACKEND=modal up to the boundary: the orchestrator and its lease, offline.

The speedrun's loop runs inside Modal (``speedrun_remote`` in backends/modal_app.py) from
the steps the launcher sends (``modal_backend.speedrun_steps``). Here the loop runs in this
process against a temp directory standing in for the volumes: stages in order, complete ones
skipped, FORCE and the background download, and one orchestrator per set of volumes (a
lease in a ``modal.Dict``, stood in for by a dict in memory). tests/e2e/test_modal_app.py covers
the app itself.
"""

from __future__ import annotations

import json
import time

import modal
import pytest

from backends import modal_app, modal_backend, modal_lease, modal_volumes
from backends.planning import speedrun_plans
from backends.stages import STAGES_BY_NAME
from nanochat.common import UsageError


@pytest.fixture
def volume_root(tmp_path, monkeypatch):
    root = tmp_path / "vol"
    monkeypatch.setenv(modal_volumes.VOLUME_ROOT_ENV, str(root))
    return root


class EagerCall:
    """Stands in for the modal.FunctionCall of spawn() here: the stage body has run already
    (a stage needs the main thread for its signal handling); get() returns its result."""

    def __init__(self, result: dict):
        self.result = result

    def get(self) -> dict:
        return self.result

    def cancel(self) -> None:
        raise AssertionError("nothing failed: nothing to cancel")


def test_orchestrator_runs_stages_in_order_and_skips_complete_ones(base_dir, volume_root):
    modal_volumes.link_base_dir(base_dir, volume_root)
    plans = [p for p in speedrun_plans(backend="modal", preset="tiny", dry_run=True)]
    wanted = ("download", "tokenizer", "tokenizer-eval")
    steps = [s for s in modal_backend.speedrun_steps(plans) if s["stage"] in wanted]
    assert [s["stage"] for s in steps] == list(wanted)
    assert all(s["gpu"] is None for s in steps)  # tiny: CPU containers

    def run_here(stage, knobs, gpu):  # the stage functions' bodies, run in this process
        return modal_app.run_stage(stage.name, knobs)

    spawned = []

    def spawn_here(stage, knobs, gpu):
        spawned.append(stage.name)
        return EagerCall(modal_app.run_stage(stage.name, knobs))

    first = modal_app.orchestrate(steps, call=run_here, spawn=spawn_here, base=base_dir)
    assert [r.get("exit_code") for r in first] == [0, 0, 0]
    assert spawned == []
    # Again, the download in the background and tokenizer-eval forced: the tokenizer is
    # skipped, the download joined before tokenizer-eval runs again.
    again_steps = [
        {**steps[0], "background": True},
        steps[1],
        {**steps[2], "force": True, "wait": True},
    ]
    again = modal_app.orchestrate(again_steps, call=run_here, spawn=spawn_here, base=base_dir)
    assert spawned == ["download"]
    assert [(r["stage"], r.get("skipped"), r.get("exit_code")) for r in again] == [
        ("tokenizer", True, None),
        ("download", None, 0),
        ("tokenizer-eval", None, 0),
    ]


def test_speedrun_steps_carry_force_env_and_the_background_download(base_dir):
    plans = speedrun_plans(backend="modal", preset="tiny", force="sft", dry_run=True)
    steps = {s["label"]: s for s in modal_backend.speedrun_steps(plans)}
    assert json.loads(json.dumps(steps)) == steps  # plain JSON for the remote call
    sft = steps["sft SOURCE=mid"]
    assert sft["force"] and sft["env"] == {"NANOCHAT_RESUME": "never"}
    assert steps["chat-eval SOURCE=sft"]["force"] and steps["chat-eval SOURCE=sft"]["env"] == {}
    assert not steps["midtrain"]["force"] and steps["midtrain"]["env"] == {}
    # The threads the dry run printed travel in the knobs (tiny: a 4-core CPU container).
    assert sft["knobs"]["env"] == {"OMP_NUM_THREADS": "4"}
    assert steps["chat-eval SOURCE=mid"]["knobs"]["source"] == "mid"
    assert steps["chat-eval SOURCE=mid"]["done"] == "report/chat-eval-mid.md"
    # In the container the forced entry starts over; a plain one resumes.
    stage = STAGES_BY_NAME["sft"]
    forced = modal_app.remote_command(stage, {**sft["knobs"], "env": sft["env"]}, base_dir)
    assert forced.env[modal_app.RESUME_ENV] == "never"
    # The remote loop turns "never" into since:<now>: Modal's retry of the forced attempt
    # (a preemption) then continues from what that attempt saved instead of starting over.
    seen = []

    def record(stage, knobs, gpu):
        seen.append(knobs["env"][modal_app.RESUME_ENV])
        return {"exit_code": 0, "seconds": 0}

    before = time.time()
    modal_app.orchestrate([sft], call=record, base=base_dir)
    assert seen[0].startswith("since:") and float(seen[0][6:]) >= int(before)
    threads = []
    modal_app.orchestrate(
        [sft], call=lambda s, k, g: threads.append(k["env"]) or {"exit_code": 0}, base=base_dir
    )
    assert threads[0]["OMP_NUM_THREADS"] == "4"  # merged, not replaced by the step's env
    assert modal_app.remote_command(stage, sft["knobs"], base_dir).env["NANOCHAT_RESUME"] == "auto"
    split = modal_backend.speedrun_steps(
        speedrun_plans(backend="modal", preset="speedrun", dry_run=True)
    )
    assert [(s["label"], s["background"]) for s in split[:2]] == [
        ("download SHARDS=8", False),
        ("download SHARDS=142", True),
    ]
    assert [s["stage"] for s in split if s["wait"]] == ["pretrain"]


def test_speedrun_dry_run_prints_every_stage_and_the_total(capsys):
    from backends.launch import speedrun

    assert speedrun(backend="modal", preset="speedrun", dry_run=True) == 0
    out = capsys.readouterr().out
    for name in ("download", "tokenizer", "pretrain", "sft", "chat-eval", "report"):
        assert f"# estimate: {name}:" in out
    assert "# estimate, all stages:" in out


# --- one speedrun per set of volumes ---------------------------------------------------------


class StandInDict:
    """modal.Dict's get/put(skip_if_exists)/pop, in memory (the server applies put's
    skip_if_exists atomically; one thread does here)."""

    def __init__(self):
        self.data = {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def put(self, key, value, *, skip_if_exists=False):
        if skip_if_exists and key in self.data:
            return False
        self.data[key] = value
        return True

    def pop(self, key, default=None):
        return self.data.pop(key, default)


def test_the_stand_in_has_the_sdks_signatures():
    import inspect

    for name in ("get", "put", "pop"):
        ours = inspect.signature(getattr(StandInDict, name)).parameters
        sdk = inspect.signature(getattr(modal.Dict, name)).parameters
        assert list(ours)[1:] == list(sdk)[1:], name


def test_one_orchestrator_holds_the_lease_and_a_dead_ones_lapses():
    store, now = StandInDict(), [1000.0]
    first = modal_lease.SpeedrunLease(store, "fc-first", clock=lambda: now[0])
    second = modal_lease.SpeedrunLease(store, "fc-second", clock=lambda: now[0])
    first.acquire()
    with pytest.raises(modal_lease.SpeedrunBusy, match="another speedrun is running .* fc-first"):
        second.acquire()
    modal_lease.SpeedrunLease(store, "fc-first", clock=lambda: now[0]).acquire()  # a retry
    now[0] += modal_lease.LEASE_S - 1
    first.renew()
    now[0] += modal_lease.LEASE_S - 1
    with pytest.raises(modal_lease.SpeedrunBusy):
        second.acquire()  # renewed: still alive
    now[0] += 2  # not renewed for a whole lease: its orchestrator died
    second.acquire()
    with pytest.raises(modal_lease.SpeedrunBusy, match="taken over"):
        first.renew()
    first.release()  # not its lease any more: left alone
    assert store.get(modal_lease.LOCK_KEY)["owner"] == "fc-second"
    second.release()
    assert store.get(modal_lease.LOCK_KEY) is None


def test_an_orchestrator_that_lost_its_lease_stops_before_the_next_stage(base_dir, volume_root):
    store, now = StandInDict(), [1000.0]
    lease = modal_lease.SpeedrunLease(store, "fc-first", clock=lambda: now[0])
    lease.acquire()
    now[0] += modal_lease.LEASE_S + 1  # it stalled; another took the volumes over
    modal_lease.SpeedrunLease(store, "fc-second", clock=lambda: now[0]).acquire()
    lease.keep_renewing(every_s=0.01).join(timeout=5)
    assert lease.lost.is_set()
    called = []
    results = modal_app.orchestrate(
        [{"stage": "report", "knobs": {}, "gpu": None}],
        call=lambda *a: called.append(a),
        base=base_dir,
        stopped=lease.lost.is_set,
    )
    assert called == [] and results == [{"stage": "report", "exit_code": 1}]


def test_a_busy_orchestrator_runs_nothing(base_dir, volume_root):
    store = StandInDict()
    modal_lease.SpeedrunLease(store, "fc-first").acquire()
    called = []
    outcome = modal_app.run_orchestrator(
        [{"stage": "report", "knobs": {}, "gpu": None}],
        modal_lease.SpeedrunLease(store, "fc-second"),
        call=lambda *a: called.append(a),
    )
    assert called == [] and "another speedrun is running" in outcome["error"]
    outcome = modal_app.run_orchestrator(
        [{"stage": "report", "knobs": {}, "gpu": None}],
        modal_lease.SpeedrunLease(store, "fc-first"),  # its own retry goes on
        call=lambda stage, knobs, gpu: called.append(stage.name) or {"exit_code": 0},
    )
    assert called == ["report"] and "error" not in outcome
    assert store.get(modal_lease.LOCK_KEY) is None  # released at the end


def test_the_launcher_refuses_a_second_speedrun_before_starting_anything(monkeypatch):
    import dataclasses

    store = StandInDict()
    modal_lease.SpeedrunLease(store, "fc-running").acquire()
    monkeypatch.setattr(modal_lease, "lock_store", lambda: store)
    started = []
    monkeypatch.setattr(modal_app.app, "run", lambda **kw: started.append(kw))
    plans = speedrun_plans(backend="modal", preset="smoke", dry_run=True)
    plans = [dataclasses.replace(p, dry_run=False) for p in plans]
    with pytest.raises(UsageError, match="another speedrun is running on these volumes"):
        modal_backend.run_speedrun(plans)
    assert started == []


def test_ctrl_c_on_the_laptop_frees_the_lease_of_the_run_it_stops(monkeypatch):
    """Without DETACH, Ctrl-C stops the app and so its orchestrator: the lease goes with it,
    so the same command can be run again at once."""
    import contextlib
    import dataclasses

    store = StandInDict()

    class Call:
        object_id = "fc-this-run"

        def get(self):
            modal_lease.SpeedrunLease(store, self.object_id).acquire()  # the orchestrator's
            raise KeyboardInterrupt

    class Orchestrator:
        def spawn(self, steps):
            return Call()

    monkeypatch.setattr(modal_lease, "lock_store", lambda: store)
    monkeypatch.setattr(modal_app.app, "run", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(modal_app, "speedrun_remote", Orchestrator())
    monkeypatch.setattr(modal, "enable_output", contextlib.nullcontext)
    plans = speedrun_plans(backend="modal", preset="smoke", dry_run=True)
    plans = [dataclasses.replace(p, dry_run=False) for p in plans]
    with pytest.raises(KeyboardInterrupt):
        modal_backend.run_speedrun(plans)
    assert store.get(modal_lease.LOCK_KEY) is None
    modal_lease.SpeedrunLease(store, "fc-other").acquire()
    modal_lease.release_lease(store, "fc-this-run")  # never another run's
    assert store.get(modal_lease.LOCK_KEY)["owner"] == "fc-other"
