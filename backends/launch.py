"""Run one stage, or the whole speedrun, on the chosen backend: execute what planning made.

Part of the launcher (tasks.py -> backends -> scripts), for every stage of the pipeline
(data -> tokenizer -> pretrain -> eval -> midtrain -> SFT -> RL -> chat/serve).
``backends/planning.py`` checks every input and builds the ``Plan``s before anything runs;
here a plan is printed (dry run) or handed to its backend's ``execute``, which returns the
exit code.

``make speedrun`` runs the planned entries in order: local and docker run that loop here
(complete entries skipped unless forced, the rest of the download fetched in the
background by a second launcher, ``python -m backends.launch``, while the tokenizer
trains), Modal remotely (``backends/modal_app.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from backends import local
from backends.planning import (
    Plan,
    backend_module,
    dry_run_note,
    entry_line,
    is_complete,
    plan,
    speedrun_notes,
    speedrun_plans,
)
from nanochat.common import UsageError


def launch(stage_name: str, **raw: object) -> int:
    """Plan, then print (dry run) or run the stage. Returns the exit code."""
    the_plan = plan(stage_name, **raw)
    backend = backend_module(the_plan.backend)
    if the_plan.dry_run:
        print(backend.describe(the_plan), flush=True)
        print(dry_run_note(the_plan), file=sys.stderr)
        return 0
    return backend.execute(the_plan)


def report_table(base_dir: Path) -> str | None:
    """The last table of report/report.md (the report card's summary); None without one."""
    try:
        lines = (base_dir / "report" / "report.md").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    tables = [block for block in blocks if block]
    return "\n".join(tables[-1]) if tables else None


def chat_hint(the_plan: Plan) -> str:
    """How to talk to the model the speedrun made, with the knobs that find it."""
    knobs = f" PRESET={the_plan.preset}"
    if the_plan.backend != "local":
        knobs += f" BACKEND={the_plan.backend}"
    if the_plan.given.get("base_dir"):
        knobs += f" BASE_DIR={the_plan.given['base_dir']}"
    if the_plan.backend == "modal":
        return f"chat with it: make chat-web{knobs} (a Modal URL)"
    return f"chat with it: make chat-cli{knobs}  (or make chat-web{knobs})"


class BackgroundRun:
    """A stage run by a second launcher (``python -m backends.launch STAGE KNOBS``), so it
    goes through the same backend as the rest; its output goes to a log under BASE_DIR/logs
    and the terminal stays with the entries in front."""

    def __init__(self, the_plan: Plan):
        self.plan = the_plan
        self.log = the_plan.base_dir / "logs" / f"speedrun-{the_plan.stage.name}-background.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        knobs = {k: v for k, v in the_plan.given.items() if k != "dry_run"}
        argv = [sys.executable, "-m", "backends.launch", the_plan.stage.name, json.dumps(knobs)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=local.REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=local.tied_to_us(),  # ends with this speedrun, however it ends
            )
        self.start = time.monotonic()
        print(
            f"[nanochat] speedrun: {the_plan.label} started in the background "
            f"(pid {self.proc.pid}, log {self.log})",
            file=sys.stderr,
            flush=True,
        )

    def wait(self) -> int:
        print(f"[nanochat] speedrun: waiting for {self.plan.label}", file=sys.stderr, flush=True)
        code = self.proc.wait()
        code = 128 - code if code < 0 else code
        took = (time.monotonic() - self.start) / 60
        print(
            f"[nanochat] speedrun: {self.plan.label} (background) exited {code} after "
            f"{took:.1f} min",
            file=sys.stderr,
        )
        if code:
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
            lines = [f"[nanochat] speedrun: the end of {self.log}:", *tail]
            print("\n".join(lines), file=sys.stderr)
        return code

    def stop(self) -> None:
        """End it when the speedrun stops early (its runner passes SIGTERM to the stage)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_entries(plans: list[Plan], backend) -> int:
    """The speedrun loop of local and docker: skip complete entries unless forced, run the
    background download beside the entries in front of it, stop at the first failure."""
    background: BackgroundRun | None = None
    try:
        for the_plan in plans:
            name = the_plan.label or the_plan.stage.name
            if the_plan.wait and background is not None:
                code, background = background.wait(), None
                if code:
                    return code
            if the_plan.background:
                background = BackgroundRun(the_plan)
                continue
            if is_complete(the_plan):
                if not the_plan.force:
                    print(
                        f"[nanochat] speedrun: {name} is complete ({the_plan.done_path}); skipping",
                        file=sys.stderr,
                    )
                    continue
                print(
                    f"[nanochat] speedrun: {name} is complete; forced: running it again",
                    file=sys.stderr,
                )
            start = time.monotonic()
            code = backend.execute(the_plan)
            took = (time.monotonic() - start) / 60
            done = f"[nanochat] speedrun: {name} exited {code} after {took:.1f} min"
            print(done, file=sys.stderr)
            if code:
                return code
        return background.wait() if background is not None else 0
    finally:
        if background is not None:
            background.stop()


def speedrun(**raw: object) -> int:
    """Every entry in order, skipping complete ones unless forced. Modal runs the loop
    remotely (so DETACH=1 survives a closed laptop); local and docker run it here."""
    plans = speedrun_plans(**raw)
    backend = backend_module(plans[0].backend)
    dry_run = plans[0].dry_run
    for line in speedrun_notes(plans):
        if dry_run:
            print(f"# {line}", flush=True)
        else:
            print(f"[nanochat] speedrun: {line}", file=sys.stderr, flush=True)
    if hasattr(backend, "run_speedrun"):
        return backend.run_speedrun(plans)
    if dry_run:
        print(
            f"# speedrun, preset {plans[0].preset}, BACKEND={plans[0].backend}: {len(plans)} "
            "entries in order; complete ones are skipped unless forced"
        )
        for number, the_plan in enumerate(plans, 1):
            print(f"# {entry_line(number, the_plan)}")
            print(backend.describe(the_plan), flush=True)
        return 0
    code = run_entries(plans, backend)
    if code == 0:
        table = report_table(plans[0].base_dir)
        print("[nanochat] speedrun: done", file=sys.stderr, flush=True)
        if table:
            print(f"report card ({plans[0].base_dir / 'report' / 'report.md'}):\n{table}")
        print(chat_hint(plans[0]), flush=True)
    return code


def main(argv: list[str]) -> int:
    """``python -m backends.launch STAGE '{"knob": value}'``: one stage, as `make STAGE`
    would run it (the speedrun's background download)."""
    try:
        if len(argv) != 2:
            raise UsageError("usage: python -m backends.launch STAGE '{\"knob\": value}'")
        try:
            knobs = json.loads(argv[1])
        except json.JSONDecodeError as exc:
            raise UsageError(f"the knobs must be a JSON object: {exc}") from None
        if not isinstance(knobs, dict):
            raise UsageError("the knobs must be a JSON object")
        return launch(argv[0], **knobs)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
