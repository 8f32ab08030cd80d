"""BACKEND=modal, the launcher's side: check credentials, print the plan and its estimate,
start the app and call the stage's function (backends/modal_app.py), report GPU-hours.

Needs only the light packages (modal, no torch). ``describe`` works without the modal
package and without a token, so ``DRY_RUN=1`` shows the plan anywhere.

    make tokenizer BACKEND=modal                  # one stage, logs streamed here
    make speedrun PRESET=speedrun BACKEND=modal DETACH=1   # keeps going without this laptop
    make chat-web BACKEND=modal                   # serve the UI through a Modal URL
    make volume-ls PATH=base_checkpoints          # what is on the volumes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from backends import pricing
from backends.command import script_args
from backends.launch import chat_hint
from backends.modal_names import VOLUME_NAMES, WEB_IDLE_S, WEB_KNOBS_ENV
from backends.planning import entry_line
from backends.presets import PRESETS
from backends.secrets import API_KEY_NAME, load_secrets
from backends.secrets import describe as describe_secrets
from backends.stages import STAGES_BY_NAME, remote_gpu, remote_resources
from nanochat.common import RESUME_ENV, UsageError

LOGIN_HELP = (
    "no Modal credentials: run `modal setup` (or `modal token new`), "
    "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
)
PROXY_AUTH_HELP = (
    "Modal proxy auth: requests need the headers Modal-Key and Modal-Secret (a proxy auth "
    "token, made at modal.com/settings/proxy-auth-tokens); set NANOCHAT_API_KEY to use a "
    "key of your own instead (then open the page as <url>/?key=<key>)"
)


def check_ready() -> None:
    """One clear line when the modal package or the credentials are missing."""
    try:
        import modal  # noqa: F401
        from modal.config import config
    except ImportError:
        raise UsageError("BACKEND=modal needs the modal package: make setup EXTRAS=modal") from None
    has_token = config.get("token_id") and config.get("token_secret")
    if not (has_token or config.get("oauth_refresh_token")):
        raise UsageError(LOGIN_HELP)


# What the planned command's environment carries to the container: the thread count the dry
# run printed (the container computes the same; a value exported here wins, as locally).
CARRIED_ENV = ("OMP_NUM_THREADS",)


def payload(plan) -> dict:
    """The knobs the remote side needs (plain JSON), preset included."""
    knobs = {k: v for k, v in plan.knobs.items() if k not in ("base_dir", "dry_run", "detach")}
    knobs["preset"] = plan.preset
    knobs["env"] = {k: v for k, v in plan.command.env.items() if k in CARRIED_ENV}
    return json.loads(json.dumps(knobs))


def estimate(plan) -> pricing.Estimate:
    reference = pricing.REFERENCE_GPU.get(plan.preset)
    ref_gpu = None if reference in (None, "cpu") else reference
    ref = remote_gpu(plan.stage, ref_gpu) if ref_gpu else None
    argv = script_args(plan.stage, plan.preset, plan.knobs)
    nodes = plan.command.nodes.count
    return pricing.estimate(plan.stage, plan.preset, plan.remote_gpu, ref, argv, nodes)


def function_label(plan) -> str:
    stage = plan.stage
    if stage.web_port:
        return stage.name.replace("-", "_")
    if plan.remote_gpu is None and stage.hardware != "cpu":
        return "stage_on_cpu"
    nodes = plan.command.nodes.count
    return "stage_" + stage.name.replace("-", "_") + (f"_x{nodes}" if nodes > 1 else "")


def container_line(plan) -> str:
    """``GPU H100:8, 64 cores, 256 GiB`` or ``no GPU (CPU container), 16 cores, 64 GiB``."""
    cores, memory = remote_resources(plan.stage, plan.remote_gpu)
    gpu = f"GPU {plan.remote_gpu}" if plan.remote_gpu else "no GPU (CPU container)"
    line = f"{gpu}, {cores} cores, {memory} GiB"
    nodes = plan.command.nodes.count
    if nodes > 1:
        line = (
            f"a cluster of {nodes} such containers (modal.clustered, RDMA), {line} each; every "
            f"container runs the command below with its cluster rank and node 0's IPv6 address"
        )
    return line


def web_auth_line(secrets: dict) -> str:
    if secrets.get(API_KEY_NAME):
        return f"auth: {API_KEY_NAME} (Authorization: Bearer <key>; the page as /?key=<key>)"
    return "auth: " + PROXY_AUTH_HELP


def check_interactive(plan) -> None:
    """A Modal function cannot read this terminal: a REPL stage needs its prompt flag."""
    stage = plan.stage
    if stage.reads_keyboard(plan.command.argv):
        raise UsageError(
            f"{stage.name} on Modal cannot read your keyboard: give it a prompt "
            f"(ARGS='{stage.prompt_flags[0]} \"Hello\"'), or chat in the browser with "
            "make chat-web BACKEND=modal"
        )


def describe(plan) -> str:
    """What a dry run prints: the function, its resources, the estimate, then the command
    that runs inside the container (the local backend's command, built for Modal)."""
    stage = plan.stage
    lines = [
        f"# modal: app nanochat, function {function_label(plan)}: {container_line(plan)}, "
        f"timeout {stage.timeout_h:g} h, retries {stage.retries}",
        f"# modal: volumes {' + '.join(VOLUME_NAMES)} as BASE_DIR "
        f"{plan.command.env.get('NANOCHAT_BASE_DIR')}; {describe_secrets(load_secrets())}",
        f"# estimate: {estimate(plan).line()}",
    ]
    if stage.web_port:
        lines.append(
            f"# modal: a web endpoint (port {stage.web_port} behind Modal's HTTPS URL), one "
            f"container, kept {WEB_IDLE_S // 60} min after the last request; "
            f"{web_auth_line(load_secrets())}"
        )
    lines.append(plan.command.shell())
    return "\n".join(lines)


def _print_result(result: dict, gpu: str | None) -> None:
    seconds = result.get("seconds", 0)
    hours = pricing.gpu_hours(gpu, seconds)
    cost = seconds / 3600 * pricing.hourly_cost(gpu, STAGES_BY_NAME[result["stage"]])
    print(
        f"[nanochat] modal: {result['stage']} exited {result['exit_code']} after "
        f"{seconds / 60:.1f} min; {hours:.2f} GPU-hours (~${cost:.2f})",
        file=sys.stderr,
    )


def _follow_hint(app) -> None:
    print(
        f"[nanochat] modal: app {app.app_id}; follow the logs with `modal app logs "
        f"{app.app_id}`, stop it with `modal app stop {app.app_id}`",
        file=sys.stderr,
        flush=True,
    )


def execute(plan) -> int:
    import modal

    if plan.stage.web_port:
        return serve_web(plan)
    check_interactive(plan)
    from backends import modal_app

    knobs = payload(plan)
    print(f"# estimate: {estimate(plan).line()}", file=sys.stderr)
    with modal.enable_output(), modal_app.app.run(detach=plan.detach):
        _follow_hint(modal_app.app)
        if plan.detach:
            call = modal_app.spawn_stage(plan.stage, knobs, plan.remote_gpu)
            print(
                f"[nanochat] modal: detached: {plan.stage.name} runs on (call {call.object_id})",
                file=sys.stderr,
            )
            return 0
        try:
            result = modal_app.call_stage(plan.stage, knobs, plan.remote_gpu)
        except Exception as exc:  # retries used up: Modal has printed the traceback
            print(f"error: {plan.stage.name} failed on Modal: {exc}", file=sys.stderr)
            return 1
    _print_result(result, plan.remote_gpu)
    return int(result["exit_code"])


def speedrun_steps(plans) -> list[dict]:
    """What ``speedrun_remote`` runs: per entry its stage, knobs, GPU, completion marker,
    whether FORCE reruns it, the env it adds (``NANOCHAT_RESUME=never`` to start over),
    and the background download's flags (``background``: start it; ``wait``: join it first)."""
    return [
        {
            "stage": p.stage.name,
            "label": p.label,
            "knobs": payload(p),
            "gpu": p.remote_gpu,
            "done": p.done_path,
            "force": p.force,
            "env": {k: v for k, v in p.command.env.items() if k == RESUME_ENV},
            "background": p.background,
            "wait": p.wait,
        }
        for p in plans
    ]


def run_speedrun(plans) -> int:
    """Print the plan and estimate; then run the loop remotely (``speedrun_remote``) and
    print the report card's table it sends back."""
    total_hours = total_cost = 0.0
    print(f"# modal speedrun, preset {plans[0].preset} ({PRESETS[plans[0].preset].summary})")
    for number, plan in enumerate(plans, 1):
        est = estimate(plan)
        # The first shards of a split download are part of the whole one's estimate.
        if not (number < len(plans) and plans[number].background):
            total_hours += est.hours
            total_cost += est.cost
        if plan.dry_run:
            print(f"# {entry_line(number, plan)}")
        print(describe(plan) if plan.dry_run else f"# estimate: {est.line()}")
    print(f"# estimate, all stages: ~{total_hours:.1f} h, ~${total_cost:,.2f} (list prices)")
    if plans[0].dry_run:
        return 0
    import modal

    from backends import modal_app, modal_lease

    steps = speedrun_steps(plans)
    fetch = "make volume-get PATH=report/report.md DEST=."
    # Before the app starts: a second speedrun on the same volumes would train into the
    # same checkpoints (the orchestrator checks again, atomically, when it starts).
    held = modal_lease.lease_holder(modal_lease.lock_store())
    if held:
        raise UsageError(modal_lease.busy_message(held))
    with modal.enable_output(), modal_app.app.run(detach=plans[0].detach):
        _follow_hint(modal_app.app)
        if plans[0].detach:
            call = modal_app.speedrun_remote.spawn(steps)
            print(
                f"[nanochat] modal: detached speedrun (call {call.object_id}); it survives "
                "this terminal. Completed stages are skipped when you run it again. When it "
                f"is done: `{fetch}` brings the report card home; {chat_hint(plans[0])}.",
                file=sys.stderr,
            )
            return 0
        # spawn().get(), not .remote(): the result of a .remote() call expires after 24 h.
        call = modal_app.speedrun_remote.spawn(steps)
        try:
            outcome = call.get()
        except KeyboardInterrupt:
            # Leaving the app stops the orchestrator; free its lease now, so that running
            # the command again does not wait for the lease to lapse.
            modal_lease.release_lease(modal_lease.lock_store(), call.object_id)
            raise
    if outcome.get("error"):
        raise UsageError(outcome["error"])
    results = outcome["results"]
    for result in results:
        if not result.get("skipped"):
            gpu = next(s["gpu"] for s in steps if s["stage"] == result["stage"])
            _print_result(result, gpu)
    failed = [r for r in results if r.get("exit_code")]
    if failed:
        return int(failed[0]["exit_code"])
    print("[nanochat] speedrun: done", file=sys.stderr, flush=True)
    if outcome.get("table"):
        print(f"report card (on the volume; `{fetch}` brings it home):\n{outcome['table']}")
    else:
        print(f"report card: `{fetch}`")
    print(chat_hint(plans[0]), flush=True)
    return 0


def serve_web(plan) -> int:
    """chat-web on Modal: an ephemeral web endpoint (like `modal serve`) until Ctrl-C."""
    import importlib

    import modal

    # The app reads these when it is imported: the web function's GPU and auth follow them.
    os.environ[WEB_KNOBS_ENV] = json.dumps(payload(plan))
    from backends import modal_app

    if modal_app.WEB_KNOBS != payload(plan):  # imported earlier in this process
        modal_app = importlib.reload(modal_app)
    print(f"# estimate: {estimate(plan).line()} per hour up", file=sys.stderr)
    with modal.enable_output(), modal_app.app.run(detach=plan.detach):
        url = modal_app.chat_web.get_web_url()
        print(
            f"[nanochat] modal: chat UI at {url} on {container_line(plan)}; "
            f"{web_auth_line(load_secrets())}. Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        if plan.detach:
            return 0
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


# ---- volumes ----------------------------------------------------------------------------


def _volume_for(path: str) -> tuple[str, str]:
    from backends.modal_volumes import volume_of

    top = path.strip("/").split("/", 1)[0]
    try:
        return volume_of(top), path.strip("/")
    except KeyError:
        raise UsageError(
            f"PATH must start with an artifact folder of BASE_DIR (base_data, tokenizer, "
            f"base_checkpoints, report, ...), got {path!r}"
        ) from None


def _modal_cli(args: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", "modal", *args]).returncode


def volume_ls(path: str = "") -> int:
    """`modal volume ls` on the volume that holds PATH (both volumes' roots without PATH)."""
    check_ready()
    if not path:
        code = 0
        for name in VOLUME_NAMES:
            print(f"# {name}:", flush=True)
            code = code or _modal_cli(["volume", "ls", name, "/"])
        return code
    volume, inner = _volume_for(path)
    return _modal_cli(["volume", "ls", volume, inner])


def volume_get(path: str, dest: str = ".") -> int:
    """`modal volume get` of PATH (relative to BASE_DIR) into DEST."""
    if not path:
        raise UsageError("volume-get needs PATH=..., e.g. PATH=base_checkpoints/d12")
    volume, inner = _volume_for(path)
    check_ready()
    return _modal_cli(["volume", "get", volume, inner, dest])
