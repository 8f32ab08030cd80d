"""The docker backend: BACKEND=docker runs the very same stage command inside the image.

Part of the launcher (tasks.py -> backends -> scripts), for every stage of the pipeline
(data -> tokenizer -> pretrain -> eval -> midtrain -> SFT -> RL -> chat/serve).

The command is the one ``backends/command.py`` builds for every backend (``python -m ...`` or
``torchrun ...``); here it runs in a container of the image built from ``docker/Dockerfile``,
with BASE_DIR bind-mounted at ``/data/nanochat`` (``planning.CONTAINER_BASE_DIR``, the path
the Dockerfile sets NANOCHAT_BASE_DIR to), so artifacts land in the same layout as a local
run, owned by the caller (the container runs as the caller's uid:gid).

Image: tagged ``nanochat:<12 hex>`` (``backends/docker_image.py``: a hash of the build
context and the build arguments). A missing tag is built with the docker CLI under BuildKit
(the Python SDK only drives the legacy builder), or with the classic builder where the CLI
has no buildx plugin (the Dockerfile needs no BuildKit feature; the log says which).
Containers are then created, streamed and stopped with the SDK, with the GPUs
CUDA_VISIBLE_DEVICES names (all of them when unset).

An interactive stage (chat-cli without ``-p``) runs as ``docker run -it`` from a terminal;
without one it stops before anything starts and says how to give it a prompt.

Signals: the container is not in our process group, so Ctrl-C / SIGTERM sent to us are
forwarded: the first one stops the container (SIGTERM to tini, which hands it to torchrun and
its workers; 30 s to save and clean up), a second kills it. The container is always removed.

``import backends.docker_backend`` needs only the standard library; the ``docker`` package is
imported when something talks to the engine or builds a container spec.

    python -m backends.docker_backend build              # make docker-build
    python -m backends.docker_backend shell [--base-dir] # make docker-shell
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from backends import local
from backends.docker_image import DOCKERFILE, IMAGE_NAME, WORKDIR, build_argv, image_tag
from backends.local import REPO_ROOT
from backends.planning import CONTAINER_BASE_DIR, Plan, check_writable, resolve_base_dir
from backends.secrets import SECRET_NAMES, load_secrets
from backends.secrets import describe as describe_secrets
from nanochat.common import BASE_DIR_ENV, CliParser, UsageError, one_line
from nanochat.gpus import visible_ids

SHM_SIZE = "16g"  # DataLoader workers and NCCL share memory through /dev/shm
# NVIDIA's advice for PyTorch containers: unlimited locked memory, a 64 MiB stack.
# Locked memory only beside GPUs (pinned buffers, NCCL): an engine whose own limit is lower
# (rootless, or a sandboxed daemon) refuses to start a container that asks for more.
ULIMITS = (("stack", 67108864, 67108864),)
GPU_ULIMITS = (("memlock", -1, -1), *ULIMITS)
CONTAINER_HOME = "/tmp"  # the caller's uid has no home in the image; caches go here
CONTAINER_USER = "nanochat"
STOP_TIMEOUT_S = 30  # between SIGTERM and SIGKILL when a run is stopped
STAGE_LABEL = "nanochat.stage"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
NO_SDK = "BACKEND=docker needs the docker package: make setup EXTRAS=docker"


class ImageBuildError(UsageError):
    """The image could not be built (its output is above): one line, like every error."""


def _sdk():
    """The docker SDK, imported only when needed so other backends never require it."""
    try:
        import docker
    except ImportError:
        raise UsageError(NO_SDK) from None
    # Without the SDK, a run from the repository root imports our docker/ folder instead
    # (a namespace package): that is no SDK either.
    if not hasattr(docker, "from_env"):
        raise UsageError(NO_SDK)
    return docker


def _engine_reason(exc: BaseException) -> str:
    """Why the engine could not be reached, short enough for one line."""
    text = one_line(exc).replace("Error while fetching server API version: ", "")
    where = os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE
    if "FileNotFoundError" in text or "No such file" in text:
        return f"no socket at {where}"
    if "Connection refused" in text:
        return f"connection refused at {where}"
    if "Permission denied" in text or "PermissionError" in text:
        return f"permission denied on {where}: is your user in the docker group?"
    return text if len(text) <= 160 else text[:157] + "..."


def connect(timeout: int = 60):
    """A client for a Docker engine that answers, or one ``UsageError`` line saying why not.
    ``timeout`` bounds each request (a stop waits its grace period on top of it)."""
    docker = _sdk()
    import requests  # a dependency of the SDK: its transport errors are requests errors

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise UsageError(
            f"cannot reach the Docker engine ({_engine_reason(exc)}): "
            "start Docker or use BACKEND=local"
        ) from None
    return client


def check_ready() -> None:
    """Raise one ``UsageError`` line when the SDK is missing or the engine does not answer."""
    connect(timeout=10).close()


# --- building -----------------------------------------------------------------------------


def ensure_image(client, tag: str, repo_root: Path = REPO_ROOT) -> bool:
    """Build the image unless the engine has the tag already. True when it built."""
    docker = _sdk()
    try:
        client.images.get(tag)
        return False
    except docker.errors.ImageNotFound:
        pass
    buildkit = _has_buildx()
    builder = "BuildKit" if buildkit else "the classic builder (no buildx plugin here)"
    print(
        f"[nanochat] docker: building image {tag} from {DOCKERFILE} with {builder} (the "
        "first build takes a while: CUDA base image + torch, ~10-20 min; later ones reuse "
        "the cached layers)",
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, "DOCKER_BUILDKIT": "1" if buildkit else "0"}
    try:
        code = subprocess.run(build_argv(tag, repo_root), cwd=repo_root, env=env).returncode
    except FileNotFoundError:
        raise ImageBuildError(
            "building the image needs the docker CLI on PATH (the SDK only runs containers)"
        ) from None
    if code:
        raise ImageBuildError(f"docker build of {tag} failed with exit code {code} (output above)")
    return True


@functools.cache
def _has_buildx() -> bool:
    """Whether the docker CLI has BuildKit's buildx plugin (DOCKER_BUILDKIT=1 needs it)."""
    try:
        probe = subprocess.run(["docker", "buildx", "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


# --- the container --------------------------------------------------------------------------


def _spec(
    tag: str,
    argv: list[str],
    environment: dict[str, str],
    base_dir: Path,
    gpus: bool,
    label: str,
) -> dict:
    docker = _sdk()
    devices = []
    if gpus:  # the GPUs CUDA_VISIBLE_DEVICES names (what the process count was made for)
        ids = visible_ids()
        if ids is None:
            devices = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        else:
            devices = [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    return {
        "image": tag,
        "command": argv,
        "environment": environment,
        "device_requests": devices,
        "shm_size": SHM_SIZE,
        "volumes": {str(base_dir): {"bind": str(CONTAINER_BASE_DIR), "mode": "rw"}},
        "working_dir": WORKDIR,
        "user": f"{os.getuid()}:{os.getgid()}",
        "init": True,
        "ulimits": [
            docker.types.Ulimit(name=n, soft=s, hard=h)
            for n, s, h in (GPU_ULIMITS if gpus else ULIMITS)
        ],
        "labels": {STAGE_LABEL: label},
        "name": f"{IMAGE_NAME}-{label}-{uuid.uuid4().hex[:8]}",
        "stdin_open": False,
        "tty": False,
    }


def _container_env(base: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
    return {**base, **secrets, "HOME": CONTAINER_HOME, "USER": CONTAINER_USER}


def container_spec(plan: Plan, tag: str, gpus: bool, secrets: dict[str, str]) -> dict:
    """The keyword arguments of ``client.containers.create(**spec)`` for a planned stage.

    A server stage (``web_port`` in the stage table) listens on all the container's
    interfaces and its port is published on the host's 127.0.0.1 only."""
    env = _container_env(plan.command.env, secrets)
    argv = list(plan.command.argv)
    port = plan.stage.web_port
    if port:
        argv += ["--host=0.0.0.0", f"--port={port}"]
        # Published on the host's 127.0.0.1 only: requests name it localhost or 127.0.0.1,
        # and the server refuses other Host names (DNS rebinding), as it does when local.
        if not any(a.startswith("--allowed-hosts") for a in argv):
            argv.append("--allowed-hosts=localhost")
    spec = _spec(tag, argv, env, plan.base_dir, gpus, plan.stage.name)
    if port:
        spec["ports"] = {f"{port}/tcp": ("127.0.0.1", port)}
    if plan.command.nodes.count > 1:
        # torchrun's rendezvous and NCCL talk to the other nodes' addresses and ports
        # directly: the container shares the host's network (no NAT, no published ports).
        spec["network_mode"] = "host"
    return spec


def cli_argv(spec: Mapping, interactive: bool = False) -> list[str]:
    """The ``docker run`` command line equivalent to a spec. Secrets appear by name only
    (``-e NAME``: docker takes the value from the caller's environment)."""
    argv = ["docker", "run", "--rm"]
    if spec.get("init"):
        argv.append("--init")
    for request in spec.get("device_requests", ()):
        ids = request.get("DeviceIDs")
        argv += ["--gpus", f'"device={",".join(ids)}"' if ids else "all"]
    argv += ["--shm-size", spec["shm_size"]]
    for host, mount in spec["volumes"].items():
        argv += ["-v", f"{host}:{mount['bind']}:{mount['mode']}"]
    for inside, (address, outside) in spec.get("ports", {}).items():
        argv += ["-p", f"{address}:{outside}:{inside.split('/')[0]}"]
    if spec.get("network_mode"):
        argv += ["--network", spec["network_mode"]]
    argv += ["-w", spec["working_dir"], "--user", spec["user"]]
    for limit in spec.get("ulimits", ()):
        argv += ["--ulimit", f"{limit.name}={limit.soft}:{limit.hard}"]
    for key, value in spec.get("labels", {}).items():
        argv += ["--label", f"{key}={value}"]
    argv += ["--name", spec["name"]]
    for name, value in spec["environment"].items():
        argv += ["-e", name if name in SECRET_NAMES else f"{name}={value}"]
    if interactive:
        argv.append("-it")
    return [*argv, spec["image"], *spec["command"]]


def describe(plan: Plan) -> str:
    """What a dry run prints: how the image is built, then the equivalent ``docker run``."""
    tag = image_tag()
    spec = container_spec(plan, tag, local.visible_gpus() > 0, load_secrets())
    build = f"DOCKER_BUILDKIT={int(_has_buildx())} " + shlex.join(build_argv(tag))
    run = shlex.join(cli_argv(spec, interactive=plan.stage.reads_keyboard(plan.command.argv)))
    return f"# image {tag} is built first when missing: {build}\n{run}"


def _quietly(action: Callable[[], object]) -> None:
    """Run a stop/kill request, ignoring the container having ended in the meantime."""
    try:
        action()
    except Exception as exc:  # a background thread has nobody to raise to
        print(f"[nanochat] docker: {one_line(exc)}", file=sys.stderr, flush=True)


def _write_out(chunk: bytes) -> None:
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        sys.stdout.write(chunk.decode(errors="replace"))
    else:
        out.write(chunk)
    sys.stdout.flush()


@contextlib.contextmanager
def watched(name: str) -> Iterator[None]:
    """While inside, a watchdog (``backends.docker_watchdog``) stops and removes container
    ``name`` if this launcher dies without doing so itself; leaving ends it quietly."""
    read_end, write_end = os.pipe()  # not inherited by other children (PEP 446)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "backends.docker_watchdog", name, str(STOP_TIMEOUT_S)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,  # out of reach of a signal to our group
        )
    finally:
        os.close(read_end)
    try:
        yield
    finally:
        os.close(write_end)  # the watchdog wakes up, finds the container gone, exits


def run_container(client, spec: dict) -> int:
    """Create, start and stream one container to its end; return its exit code.

    The first SIGINT/SIGTERM stops the container (in a thread, so its output keeps
    streaming), a second kills it. A run ended that way returns 128+N for the first signal
    N, unless the stage exited with its own code (1-127) after saving its work.
    """
    docker = _sdk()
    received: list[int] = []
    container = None
    started = threading.Event()

    def stop() -> None:
        print(
            f"[nanochat] docker: stopping {spec['name']} "
            f"(SIGTERM, {STOP_TIMEOUT_S} s to finish; signal again to kill it)",
            file=sys.stderr,
            flush=True,
        )
        container.stop(timeout=STOP_TIMEOUT_S)

    def act() -> None:
        request = stop if len(received) == 1 else container.kill
        threading.Thread(target=_quietly, args=(request,), daemon=True).start()

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if started.is_set():
            act()

    # Handlers first: a Ctrl-C from here on can no longer leave a container behind.
    guard = contextlib.ExitStack()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        guard.enter_context(watched(spec["name"]))
        container = client.containers.create(**spec)
        if not received:
            try:
                container.start()
            except docker.errors.APIError as exc:
                hint = ""
                if spec.get("device_requests") and "device driver" in str(exc):
                    hint = ": GPUs need the NVIDIA Container Toolkit on this machine"
                raise UsageError(
                    f"docker could not start the container ({one_line(exc)}){hint}"
                ) from None
            started.set()
        if received:  # a signal came before the stage ran: nothing to wait for
            return 128 + received[0]
        sys.stdout.flush()
        for chunk in container.logs(stream=True, follow=True):
            _write_out(chunk)
        code = int(container.wait()["StatusCode"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
        guard.close()
    if received and not 0 < code < 128:
        return 128 + received[0]
    return code


def _at_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _run_interactive(client, spec: dict, secrets: Mapping[str, str]) -> int:
    """``docker run -it`` (the SDK cannot drive a terminal well): the terminal sends Ctrl-C
    to the program inside; this process just waits. A container the CLI leaves behind (the
    CLI killed, or detached with Ctrl-P Ctrl-Q) is removed when it returns."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        argv = cli_argv(spec, interactive=True)
        with watched(spec["name"]):  # closed after the removal below: a normal end is quiet
            try:
                return subprocess.run(argv, env={**os.environ, **secrets}).returncode
            finally:
                try:
                    client.containers.get(spec["name"]).remove(force=True)
                except Exception:  # gone already (--rm): the usual case
                    pass
    finally:
        signal.signal(signal.SIGINT, previous)


def execute(plan: Plan, client=None) -> int:
    """Run a planned stage in a container of the image (built first when missing)."""
    keyboard = plan.stage.reads_keyboard(plan.command.argv)
    if keyboard and not _at_terminal():
        flag = plan.stage.prompt_flags[0]
        raise UsageError(
            f"{plan.stage.name} reads your keyboard and this is no terminal: run it from "
            f"one (it runs as docker run -it), or give it a prompt: ARGS='{flag} \"Hello\"'"
        )
    own_client = client is None
    client = client or connect()
    tag = image_tag()
    ensure_image(client, tag)
    secrets = load_secrets()
    spec = container_spec(plan, tag, local.visible_gpus() > 0, secrets)
    print(
        f"[nanochat] docker: {plan.stage.name} in {tag}: {plan.command.shell()}",
        file=sys.stderr,
    )
    print(f"[nanochat] docker: {describe_secrets(secrets)}", file=sys.stderr, flush=True)
    # Made here, so it is ours: the engine would create a missing bind source as root.
    plan.base_dir.mkdir(parents=True, exist_ok=True)
    try:
        if keyboard:
            return _run_interactive(client, spec, secrets)
        return run_container(client, spec)
    finally:
        if own_client:
            client.close()


# --- make docker-build / make docker-shell --------------------------------------------------


def build() -> int:
    """Build the image for the current source unless it exists; print its tag."""
    client = connect()
    tag = image_tag()
    if not ensure_image(client, tag):
        print(f"[nanochat] docker: image {tag} is up to date", file=sys.stderr)
    print(tag, flush=True)
    return 0


def shell(base_dir: Path) -> int:
    """An interactive bash in the image: GPUs when visible, BASE_DIR mounted, secrets set.

    Runs the ``docker run -it`` CLI (the SDK cannot drive an interactive terminal well).
    """
    client = connect()
    if not _at_terminal():
        raise UsageError("the docker shell is interactive: run it from a terminal")
    try:
        tag = image_tag()
        ensure_image(client, tag)
        secrets = load_secrets()
        env = _container_env({BASE_DIR_ENV: str(CONTAINER_BASE_DIR)}, secrets)
        spec = _spec(tag, ["bash"], env, base_dir, local.visible_gpus() > 0, "shell")
        base_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"[nanochat] docker: bash in {tag}, BASE_DIR {base_dir} at {CONTAINER_BASE_DIR}; "
            f"{describe_secrets(secrets)}",
            file=sys.stderr,
            flush=True,
        )
        return _run_interactive(client, spec, secrets)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(
        prog="python -m backends.docker_backend",
        description="build the nanochat image, or open a shell in it",
    )
    parser.add_argument("action", choices=("build", "shell"))
    parser.add_argument("--base-dir", help="mounted at /data/nanochat (default: BASE_DIR)")
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            return build()
        base_dir = resolve_base_dir(args.base_dir)
        check_writable(base_dir)
        return shell(base_dir)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
