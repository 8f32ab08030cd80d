"""The Modal app: every stage as a Modal function, in the image of docker/Dockerfile.

Part of the launcher (tasks.py -> backends -> scripts), for every stage of the pipeline
(data -> tokenizer -> pretrain -> eval -> midtrain -> SFT -> RL -> chat/serve).

``make <stage> BACKEND=modal`` (backends/modal_backend.py) runs the function of that stage;
``make speedrun BACKEND=modal`` runs ``speedrun_remote``, which calls the stage functions in
order from inside Modal (the background download with ``.spawn()``, joined with ``.get()``),
so a detached run survives the laptop. Inside the container a
stage runs through the local backend's own runner (backends/local.py): the same command,
the same signal handling, the same exit codes.

Layout on Modal (``backends/modal_volumes.py``): two volumes, mounted under ``/vol``, and
BASE_DIR (``/data/nanochat``, as in the image) made of symlinks into them, so every path a
stage uses is the same as on a laptop; they are committed whenever a new checkpoint appears
and when the stage ends, so a preempted and retried stage resumes from its latest checkpoint.

This module imports no torch (the laptop only launches) and needs no Modal token to
import: the tests introspect it offline. Do not rename it to ``modal.py``: ``modal run
backends/modal.py`` would put backends/ first on sys.path and ``import modal`` would import
itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import modal

from backends import command, local, modal_lease
from backends.launch import report_table
from backends.modal_names import WEB_IDLE_S, WEB_KNOBS_ENV
from backends.modal_volumes import (
    VOLUME_MOUNTS,
    VOLUME_ROOT,
    VOLUME_ROOT_ENV,
    VOLUMES,
    CheckpointCommitter,
    commit_volumes,
    link_base_dir,
    unpersisted,
    volumes,
)
from backends.pricing import gpu_hours
from backends.secrets import API_KEY_NAME, load_secrets
from backends.stages import (
    CLUSTER_SIZES,
    REMOTE_CPU_CORES,
    REMOTE_CPU_MEMORY_GB,
    STAGES,
    STAGES_BY_NAME,
    Stage,
    remote_gpu,
    remote_resources,
    remote_threads,
)
from nanochat.common import BASE_DIR_ENV, COMMIT_DIR_ENV, RESUME_ENV
from nanochat.training import run_lock

APP_NAME = "nanochat"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODAL_SECRET_ENV = "NANOCHAT_MODAL_SECRET"  # optional name of a Modal secret to attach too
USAGE_ERROR = 2  # a stage's bad-input exit code: retrying cannot help


def function_name(stage_name: str, nodes: int = 1) -> str:
    """``stage_pretrain``; ``stage_pretrain_x2`` for the clustered function of 2 nodes."""
    return "stage_" + stage_name.replace("-", "_") + (f"_x{nodes}" if nodes > 1 else "")


def resource_options(stage: Stage, gpu: str | None) -> dict[str, object]:
    """Modal's gpu, cpu and memory (MiB) for ``stage`` on ``gpu`` (stages.remote_resources)."""
    cores, memory_gb = remote_resources(stage, gpu)
    return {"gpu": gpu, "cpu": float(cores), "memory": memory_gb * 1024}


def stage_options(stage: Stage) -> dict[str, object]:
    """The Modal options of a stage's function, straight from the stage table."""
    return {
        **resource_options(stage, remote_gpu(stage, None)),
        "timeout": int(stage.timeout_h * 3600),
        "retries": (
            modal.Retries(max_retries=stage.retries, initial_delay=10.0, backoff_coefficient=2.0)
            if stage.retries
            else 0
        ),
    }


def in_container() -> bool:
    """True when Modal's container imports this module (it sets MODAL_IS_REMOTE=1)."""
    return os.environ.get("MODAL_IS_REMOTE") == "1"


def function_secrets() -> list[modal.Secret]:
    """The secrets every function declares, the same list on the laptop and in the container.

    Modal hydrates a function's dependencies by position, so the container's import must
    declare as many as the laptop's did, or it dies with "Function has N dependencies but
    container got M object ids". The container has no .env and none of the laptop's
    variables, so nothing may depend on them there. Hence always exactly one dict secret
    (WANDB_API_KEY, HF_TOKEN, NANOCHAT_API_KEY, HF_ENDPOINT from the environment or .env,
    possibly none) which also carries NANOCHAT_MODAL_SECRET, then the named secret when
    that names one. In the container the dict secret's variables are already set, so the
    same NANOCHAT_MODAL_SECRET decides the same list; its values come from Modal by id."""
    values = dict_secret_values()
    found = [modal.Secret.from_dict(values)]
    if values[MODAL_SECRET_ENV]:
        found.append(modal.Secret.from_name(values[MODAL_SECRET_ENV]))
    return found


def dict_secret_values() -> dict[str, str]:
    """What the dict secret holds, i.e. what Modal injects into every container: the
    secrets this side sees (none in the container, where only the ids matter) and the
    name of the named secret ("" for none)."""
    values = {} if in_container() else load_secrets()
    return {**values, MODAL_SECRET_ENV: os.environ.get(MODAL_SECRET_ENV, "")}


DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
CONTEXT_DIR = REPO_ROOT  # Modal's default is the current directory: never rely on it
image = modal.Image.from_dockerfile(str(DOCKERFILE), context_dir=str(CONTEXT_DIR))
SECRETS = function_secrets()
# include_source=False: the code comes from the image (COPY . .), one copy only.
app = modal.App(APP_NAME, image=image, volumes=VOLUME_MOUNTS, include_source=False)


# ---- inside the container ----------------------------------------------------------------


def remote_command(
    stage: Stage, knobs: dict, base: Path, nodes: command.Nodes = command.SINGLE_NODE
) -> command.StageCommand:
    """The stage's command as built here, in the container: processes = GPUS or every GPU
    this container has (read at run time), threads from the container's requested size,
    as the dry run computed them (knobs["env"] carries the launcher's OMP_NUM_THREADS).
    Training stages resume (NANOCHAT_RESUME=auto) unless knobs["env"] says otherwise (a
    forced speedrun entry starts over: "since:<start>"). ``nodes``: this container's place
    in its cluster (``cluster_nodes``)."""
    visible = local.visible_gpus()
    nproc = 1
    if stage.multiprocess:
        nproc = int(knobs["gpus"]) if knobs.get("gpus") else max(visible, 1)
    threads = remote_threads(stage, remote_gpu(stage, knobs.get("gpu")), nproc)
    preset = str(knobs.get("preset") or "tiny")
    cmd = command.build(stage, preset, knobs, nproc, base, threads, nodes)
    cmd.env.update({str(k): str(v) for k, v in (knobs.get("env") or {}).items()})
    if stage.retries:
        cmd.env.setdefault(RESUME_ENV, "auto")
    if nodes.count > 1 and ":" in str(nodes.master_addr):
        # The cluster's addresses are IPv6 (Modal's i6pn): NCCL's bootstrap sockets must
        # use that family too, or ranks on other nodes are unreachable.
        cmd.env.setdefault("NCCL_SOCKET_FAMILY", "AF_INET6")
    return cmd


def cluster_nodes(count: int, port: int, cluster=None) -> command.Nodes:
    """This container's place in its Modal cluster: its rank, node 0's (IPv6) address.
    ``cluster`` defaults to ``modal.Cluster.from_context()`` (only inside a clustered call)."""
    cluster = cluster or modal.Cluster.from_context()
    addresses = cluster.container_ips()  # rank order; IPv6 by default
    if len(addresses) != count:
        raise RuntimeError(f"NODES={count} but the Modal cluster has {len(addresses)} containers")
    return command.Nodes(count, cluster.container_rank(), addresses[0], port)


class StageFailed(RuntimeError):
    """Raised so that Modal's retry policy applies (a crash, a kill, a lost GPU)."""


def run_stage(stage_name: str, knobs: dict, cluster=None) -> dict:
    """The body of every stage function: link BASE_DIR to the volumes, run the command with
    the local runner, commit on every new checkpoint (at once when a checkpoint asks:
    $NANOCHAT_COMMIT_DIR) and at the end; report GPU-hours. With NODES>1 it runs in every
    container of a cluster (``cluster``: the Modal cluster, found from the context), each
    its node of the same torchrun command."""
    stage = STAGES_BY_NAME[stage_name]
    base = Path(os.environ.get(BASE_DIR_ENV) or "/data/nanochat")
    link_base_dir(base, Path(os.environ.get(VOLUME_ROOT_ENV) or VOLUME_ROOT))
    count = int(knobs.get("nodes") or 1)
    nodes = command.SINGLE_NODE
    if count > 1 and stage.multiprocess:
        port = int(knobs.get("master_port") or command.DEFAULT_MASTER_PORT)
        nodes = cluster_nodes(count, port, cluster)
    cmd = remote_command(stage, knobs, base, nodes)
    # A retry after a preemption is the same function call in a new container: the run
    # lock of the tag (nanochat.training.run_lock) knows it by this id and lets it take over.
    call_id = modal.current_function_call_id()
    if call_id:
        cmd.env.setdefault(run_lock.RUN_ID_ENV, call_id)
    # On several nodes a save waits until every node has committed its files (the save's
    # protocol: nanochat/training/checkpoint.py); one node's are all here, and the committer
    # commits them once the meta appears, off the training's path.
    requests = None
    if nodes.count > 1:
        requests = Path(tempfile.mkdtemp(prefix="nanochat-commits-"))  # outside the volumes
        cmd.env[COMMIT_DIR_ENV] = str(requests)
    gpus_here = local.visible_gpus()
    where = f" (node {nodes.rank} of {nodes.count})" if nodes.count > 1 else ""
    print(f"[nanochat] modal: {stage.name} on {gpus_here or 'no'} GPU(s){where}: {cmd.shell()}")
    committer = CheckpointCommitter(base, requests=requests)
    committer.start()
    start = time.monotonic()
    try:
        code = local.run(cmd)
    finally:
        committer.stop()
        commit_volumes()
        if requests is not None:
            shutil.rmtree(requests, ignore_errors=True)
    seconds = time.monotonic() - start
    stray = unpersisted(base)
    if stray:
        print(f"[nanochat] modal: warning: not on a volume, lost with the container: {stray}")
    result = {
        "stage": stage.name,
        "exit_code": code,
        "seconds": round(seconds, 1),
        "gpus": gpus_here,
        "nodes": nodes.count,
        "gpu_hours": round(gpus_here * nodes.count * seconds / 3600, 4),
    }
    print(f"[nanochat] modal: {stage.name}{where} exited {code} after {seconds / 60:.1f} min")
    if code not in (0, USAGE_ERROR):
        raise StageFailed(f"stage {stage.name} exited with code {code}")
    return result


def _register_stage_function(stage: Stage):
    def body(knobs: dict) -> dict:
        return run_stage(stage.name, knobs)

    body.__name__ = body.__qualname__ = function_name(stage.name)
    body.__doc__ = f"{stage.name}: {stage.summary}"
    return app.function(secrets=SECRETS, **stage_options(stage))(body)


def _register_cluster_function(stage: Stage, nodes: int):
    """The stage on a cluster of ``nodes`` containers (``modal.clustered``, RDMA between
    them), each a whole 8-GPU host; Modal broadcasts the call to every container and
    returns rank 0's result."""

    def body(knobs: dict) -> dict:
        return run_stage(stage.name, {**knobs, "nodes": nodes})

    body.__name__ = body.__qualname__ = function_name(stage.name, nodes)
    body.__doc__ = f"{stage.name} on {nodes} nodes: {stage.summary}"
    options = {**stage_options(stage), **resource_options(stage, CLUSTER_GPU)}
    return app.function(secrets=SECRETS, **options)(modal.clustered(size=nodes, rdma=True)(body))


# One function per stage, with the GPU, timeout and retries the stage table gives, and one
# clustered function per size for the multi-GPU stages; module globals, because Modal finds
# a function in its container by its name in this module.
CLUSTER_GPU = "H100:8"  # the clustered functions' default GPU (GPU=B200:8 etc. overrides)
STAGE_FUNCTIONS = {stage.name: _register_stage_function(stage) for stage in STAGES}
CLUSTER_FUNCTIONS = {
    (stage.name, nodes): _register_cluster_function(stage, nodes)
    for stage in STAGES
    if stage.multiprocess
    for nodes in CLUSTER_SIZES
}
globals().update({function_name(name): fn for name, fn in STAGE_FUNCTIONS.items()})
globals().update({function_name(*key): fn for key, fn in CLUSTER_FUNCTIONS.items()})


@app.function(
    secrets=SECRETS,
    cpu=float(REMOTE_CPU_CORES),
    memory=REMOTE_CPU_MEMORY_GB * 1024,
    timeout=24 * 3600,
)
def stage_on_cpu(stage_name: str, knobs: dict) -> dict:
    """Any stage in a CPU-only container (GPU=cpu, e.g. the tiny preset's remote smoke test):
    Modal cannot take the GPU away from a function that was declared with one."""
    return run_stage(stage_name, knobs)


def function_for(stage: Stage, gpu: str | None, nodes: int = 1):
    """The Modal function that runs ``stage`` on ``gpu`` (a Modal GPU string or None), on a
    cluster of ``nodes`` for a multi-GPU stage."""
    if nodes > 1 and stage.multiprocess:
        fn = CLUSTER_FUNCTIONS[(stage.name, nodes)]
        if gpu != CLUSTER_GPU:
            fn = fn.with_options(**resource_options(stage, gpu))
        return fn, False
    if gpu is None and stage.hardware != "cpu":
        return stage_on_cpu, True
    fn = STAGE_FUNCTIONS[stage.name]
    if gpu != remote_gpu(stage, None):
        fn = fn.with_options(**resource_options(stage, gpu))
    return fn, False


def _bound(stage: Stage, knobs: dict, gpu: str | None):
    """The function that runs ``stage`` on ``gpu`` (on ``knobs["nodes"]`` nodes) and the
    arguments it takes."""
    fn, on_cpu = function_for(stage, gpu, int(knobs.get("nodes") or 1))
    if on_cpu:
        options = stage_options(stage)
        fn = fn.with_options(
            timeout=options["timeout"],
            retries=options["retries"],
            **{k: v for k, v in resource_options(stage, None).items() if k != "gpu"},
        )
        return fn, (stage.name, knobs)
    return fn, (knobs,)


def call_stage(stage: Stage, knobs: dict, gpu: str | None) -> dict:
    """Run the stage and wait for its result. ``spawn().get()``, not ``.remote()``: a
    ``.remote()`` call's result expires after 24 h, shorter than a long stage with retries;
    a spawned call's result stays for days."""
    return spawn_stage(stage, knobs, gpu).get()


def spawn_stage(stage: Stage, knobs: dict, gpu: str | None):
    """Start the stage without waiting: a ``modal.FunctionCall`` (``.get()`` waits for its
    result and raises when the stage failed for good, ``.cancel()`` stops it)."""
    fn, args = _bound(stage, knobs, gpu)
    return fn.spawn(*args)


def _join(pending: list, results: list[dict]) -> bool:
    """Wait for the background calls; False when one failed."""
    ok = True
    for step, handle in pending:
        label = step.get("label") or step["stage"]
        print(f"[nanochat] speedrun: waiting for {label} (in the background)")
        try:
            result = handle.get()
        except Exception as exc:  # its retries are used up
            print(f"[nanochat] speedrun: {label} (background) failed: {exc}")
            result = {"stage": step["stage"], "exit_code": 1}
        print(f"[nanochat] speedrun: {label} (background) exited {result.get('exit_code')}")
        results.append(result)
        ok = ok and not result.get("exit_code")
    pending.clear()
    return ok


def orchestrate(
    steps: list[dict],
    call=call_stage,
    spawn=spawn_stage,
    base: Path | None = None,
    stopped=lambda: False,
) -> list[dict]:
    """Run speedrun steps in order: skip complete ones unless forced, stop at the first
    failure. Each step (backends/modal_backend.py speedrun_steps): {"stage", "label",
    "knobs", "gpu", "done" (marker under BASE_DIR or None), "force" (run even when
    complete), "env" (added to the stage's command; NANOCHAT_RESUME=never becomes
    since:<now>, so a retry resumes the forced attempt), "background" (start it and go on),
    "wait" (join the background calls first)}. ``stopped()`` true (the lease was lost to
    another orchestrator) ends the run before the next step."""
    base = base or Path(os.environ.get(BASE_DIR_ENV) or "/data/nanochat")
    results: list[dict] = []
    pending: list = []  # (step, call handle) of background steps
    failed = False
    for step in steps:
        stage = STAGES_BY_NAME[step["stage"]]
        label = step.get("label") or stage.name
        if stopped():
            print(f"[nanochat] speedrun: stopping before {label}: the lease was lost")
            results.append({"stage": stage.name, "exit_code": 1})
            failed = True
            break
        if step.get("wait") and pending and not _join(pending, results):
            failed = True
            break
        for vol in volumes.values():
            if not modal.is_local():
                vol.reload()  # see what the previous stage committed
        env = dict(step.get("env") or {})
        if env.get(RESUME_ENV) == "never":
            # A forced training stage starts over, but Modal's retry of it (a preemption)
            # must continue what this attempt saved: only checkpoints from now on count.
            env[RESUME_ENV] = f"since:{time.time():.0f}"
        # The step's env (FORCE's resume mode) on top of what the payload carries (threads).
        knobs = {**step["knobs"], "env": {**(step["knobs"].get("env") or {}), **env}}
        if step.get("background"):
            print(f"[nanochat] speedrun: {label} on {step['gpu'] or 'CPU'}, in the background")
            pending.append((step, spawn(stage, knobs, step["gpu"])))
            continue
        if step.get("done") and (base / step["done"]).exists():
            if not step.get("force"):
                print(f"[nanochat] speedrun: {label} is complete ({step['done']}); skipping")
                results.append({"stage": stage.name, "skipped": True})
                continue
            print(f"[nanochat] speedrun: {label} is complete; forced: running it again")
        print(f"[nanochat] speedrun: {label} on {step['gpu'] or 'CPU'}")
        try:
            result = call(stage, knobs, step["gpu"])
        except Exception as exc:  # the stage's retries are used up
            print(f"[nanochat] speedrun: {label} failed: {exc}")
            results.append({"stage": stage.name, "exit_code": 1})
            failed = True
            break
        hours = gpu_hours(step["gpu"], result.get("seconds", 0))
        print(f"[nanochat] speedrun: {label} used {hours:.2f} GPU-hours")
        results.append(result)
        if result.get("exit_code"):
            failed = True
            break
    if failed:
        for _, handle in pending:
            try:
                handle.cancel()
            except Exception as exc:  # it may have ended meanwhile
                print(f"[nanochat] speedrun: could not cancel a background call: {exc}")
    else:
        _join(pending, results)
    return results


# Non-preemptible (a CPU function may be): a preempted orchestrator would be restarted and
# re-run its loop while the stage it had started keeps going.
@app.function(
    secrets=SECRETS, cpu=1.0, memory=1024, timeout=24 * 3600, retries=2, nonpreemptible=True
)
def speedrun_remote(steps: list[dict]) -> dict:
    """The speedrun's loop, inside Modal: a detached run keeps going without the laptop;
    when this orchestrator is restarted it skips the stages already complete. Holds the
    volumes' lease while it runs (one speedrun at a time). Returns {"results": one dict per
    step run or skipped, "table": the report card's summary} or {"error": why not}."""
    owner = modal.current_function_call_id() or f"local-{os.getpid()}"
    return run_orchestrator(steps, modal_lease.SpeedrunLease(modal_lease.lock_store(), owner))


def run_orchestrator(
    steps: list[dict], lease: modal_lease.SpeedrunLease, **orchestrate_options
) -> dict:
    try:
        lease.acquire()
    except modal_lease.SpeedrunBusy as exc:
        print(f"[nanochat] speedrun: {exc}")
        return {"results": [], "error": str(exc)}
    lease.keep_renewing()
    try:
        base = Path(os.environ.get(BASE_DIR_ENV) or "/data/nanochat")
        link_base_dir(base, Path(os.environ.get(VOLUME_ROOT_ENV) or VOLUME_ROOT))
        results = orchestrate(steps, base=base, stopped=lease.lost.is_set, **orchestrate_options)
        if not modal.is_local():
            for vol in volumes.values():
                vol.reload()  # the report stage's commit
        return {"results": results, "table": report_table(base)}
    finally:
        lease.release()


# ---- the web UI --------------------------------------------------------------------------

CHAT_WEB = STAGES_BY_NAME["chat-web"]
WEB_PORT = CHAT_WEB.web_port


def web_command(knobs: dict, base: Path) -> command.StageCommand:
    """chat-web's command, listening on all interfaces of the container for Modal's proxy,
    with the threads the dry run printed (knobs["env"])."""
    extra = f"--host=0.0.0.0 --port={WEB_PORT}"
    knobs = {**knobs, "args": f"{knobs.get('args') or ''} {extra}".strip()}
    threads = remote_threads(CHAT_WEB, remote_gpu(CHAT_WEB, knobs.get("gpu")), 1)
    cmd = command.build(CHAT_WEB, str(knobs.get("preset") or "tiny"), knobs, 1, base, threads)
    cmd.env.update({str(k): str(v) for k, v in (knobs.get("env") or {}).items()})
    return cmd


def _secret(name: str) -> str | None:
    """A secret's value as this side sees it: the container's environment (Modal injected
    the dict secret there), the laptop's environment or .env."""
    return os.environ.get(name) if in_container() else load_secrets().get(name)


# chat-web's knobs, fixed when the app is built: the launcher sets them before importing
# this module, and the function's env carries them into the container, so both sides
# declare the same GPU and auth.
WEB_KNOBS = json.loads(os.environ.get(WEB_KNOBS_ENV) or "{}")
WEB_GPU = remote_gpu(CHAT_WEB, WEB_KNOBS.get("gpu"))
WEB_KEYED = bool(_secret(API_KEY_NAME))


@app.function(
    secrets=SECRETS,
    **resource_options(CHAT_WEB, WEB_GPU),
    timeout=int(CHAT_WEB.timeout_h * 3600),
    env={WEB_KNOBS_ENV: json.dumps(WEB_KNOBS)},
    # One container serves every request (the server queues them): a bounded bill. It stays
    # up WEB_IDLE_S after the last request, so a pause in a chat does not reload the model.
    max_containers=1,
    scaledown_window=WEB_IDLE_S,
)
@modal.concurrent(max_inputs=64)
# Loading a model takes far longer than web_server's default 5 s. Without NANOCHAT_API_KEY
# (which the server then checks itself) Modal's proxy lets in only requests that carry a
# proxy auth token: the URL is never open to anyone.
@modal.web_server(WEB_PORT, startup_timeout=600, requires_proxy_auth=not WEB_KEYED)
def chat_web() -> None:
    base = Path(os.environ.get(BASE_DIR_ENV) or "/data/nanochat")
    link_base_dir(base, Path(os.environ.get(VOLUME_ROOT_ENV) or VOLUME_ROOT))
    cmd = web_command(WEB_KNOBS, base)
    print(f"[nanochat] modal: serving {cmd.shell()}")
    subprocess.Popen(cmd.argv, env=local.child_env(cmd.env), cwd=REPO_ROOT)


def describe_functions() -> list[str]:
    """One line per registered function (``python -m backends.modal_app``)."""
    lines = []
    for stage in STAGES:
        opts = stage_options(stage)
        retries = stage.retries
        lines.append(
            f"{function_name(stage.name):<22} gpu={opts['gpu'] or 'none'} "
            f"timeout={stage.timeout_h:g}h retries={retries}"
        )
    for (name, nodes), fn in CLUSTER_FUNCTIONS.items():
        lines.append(
            f"{function_name(name, nodes):<22} gpu={fn._spec_.gpus} x {nodes} nodes "
            f"(modal.clustered, RDMA; NODES={nodes})"
        )
    lines.append(f"{'stage_on_cpu':<22} gpu=none (any stage with GPU=cpu)")
    lines.append(f"{'speedrun_remote':<22} gpu=none (runs the stages in order)")
    lines.append(f"{'chat_web':<22} gpu={WEB_GPU or 'none'} web server on :{WEB_PORT}")
    return lines


if __name__ == "__main__":
    print("\n".join(describe_functions()))
    print("volumes: " + ", ".join(f"{n} {VOLUMES[n]}" for n in VOLUMES))
    sys.exit(0)
