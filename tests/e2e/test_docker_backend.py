"""BACKEND=docker: the container spec, its `docker run` twin, the image tag, engine errors,
and, where a Docker engine answers, a real build and a real tiny stage in a container.

Everything but the last test runs offline without an engine: plans come from dry runs (which
skip the engine check) and specs are built from the real docker SDK types.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import docker
import pytest
from conftest import REPO, run_cli

from backends import docker_backend, docker_image, local
from backends.planning import plan
from backends.secrets import load_secrets
from nanochat.common import UsageError

WANDB = "wandb-value-3f9c1e"
HF = "hf-value-77ab20"
NO_ENGINE = (
    "no Docker engine here (docker ping failed): "
    "building the image and running a container were not run"
)
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def docker_plan(tmp_path, stage="tokenizer", backend="docker", **knobs):
    return plan(
        stage, backend=backend, preset="tiny", dry_run=True, base_dir=str(tmp_path), **knobs
    )


def spec_for(tmp_path, gpus: bool, secrets=None, **knobs) -> dict:
    the_plan = docker_plan(tmp_path, **knobs)
    return docker_backend.container_spec(the_plan, "nanochat:0123456789ab", gpus, secrets or {})


# --- the container spec -------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, knobs",
    [("tokenizer", {}), ("pretrain", {"gpus": "2"})],
)
def test_spec_runs_the_local_command_with_base_dir_mounted(tmp_path, stage, knobs):
    the_plan = docker_plan(tmp_path, stage, **knobs)
    local_plan = docker_plan(tmp_path, stage, backend="local", **knobs)
    spec = docker_backend.container_spec(the_plan, "nanochat:0123456789ab", False, {})
    assert spec["image"] == "nanochat:0123456789ab"
    assert spec["command"] == local_plan.command.argv  # the very same command
    if stage == "pretrain":
        assert spec["command"][:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert spec["volumes"] == {str(tmp_path): {"bind": "/data/nanochat", "mode": "rw"}}
    env = spec["environment"]
    assert env["NANOCHAT_BASE_DIR"] == "/data/nanochat"
    assert env["OMP_NUM_THREADS"] == the_plan.command.env["OMP_NUM_THREADS"]
    assert (env["HOME"], env["USER"]) == ("/tmp", "nanochat")
    assert spec["shm_size"] == "16g"
    assert spec["working_dir"] == "/app"
    assert spec["user"] == f"{os.getuid()}:{os.getgid()}"
    assert spec["init"] is True
    assert (spec["stdin_open"], spec["tty"]) == (False, False)
    assert spec["labels"] == {"nanochat.stage": stage}
    assert spec["name"].startswith(f"nanochat-{stage}-")
    assert spec["name"] != docker_backend.container_spec(the_plan, "x", False, {})["name"]
    limits = {u.name: (u.soft, u.hard) for u in spec["ulimits"]}
    assert limits == {"stack": (67108864, 67108864)}  # unlimited memlock only with GPUs
    assert all(isinstance(u, docker.types.Ulimit) for u in spec["ulimits"])


def test_gpus_become_one_device_request_for_all_of_them(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with_gpus = spec_for(tmp_path, gpus=True)["device_requests"]
    assert with_gpus == [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    assert isinstance(with_gpus[0], docker.types.DeviceRequest)
    assert (with_gpus[0].count, with_gpus[0].capabilities) == (-1, [["gpu"]])
    assert spec_for(tmp_path, gpus=False)["device_requests"] == []
    assert "--gpus all" in shlex.join(docker_backend.cli_argv(spec_for(tmp_path, gpus=True)))
    assert "--gpus" not in docker_backend.cli_argv(spec_for(tmp_path, gpus=False))
    limits = {u.name: (u.soft, u.hard) for u in spec_for(tmp_path, gpus=True)["ulimits"]}
    assert limits == {"memlock": (-1, -1), "stack": (67108864, 67108864)}


def test_cuda_visible_devices_passes_only_those_gpus(tmp_path, monkeypatch):
    """GPUS counts the GPUs CUDA_VISIBLE_DEVICES names: the container gets those, not all."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    (request,) = spec_for(tmp_path, gpus=True)["device_requests"]
    assert (request.device_ids, request.count) == (["1", "3"], 0)
    text = shlex.join(docker_backend.cli_argv(spec_for(tmp_path, gpus=True)))
    assert "--gpus '\"device=1,3\"'" in text and "--gpus all" not in text


def test_the_spec_is_accepted_by_the_sdk(tmp_path, monkeypatch):
    """The SDK turns the keyword arguments into the engine's create request without
    complaint (this is where a misspelled keyword or a wrong type would fail): the same
    conversion containers.create(**spec) does before it sends the request."""
    from docker.models.containers import _create_container_args

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = spec_for(tmp_path, gpus=True, secrets={"HF_TOKEN": HF})
    version = docker.constants.DEFAULT_DOCKER_API_VERSION
    args = _create_container_args({**spec, "version": version})
    assert args.pop("name") == spec["name"]
    body = docker.types.ContainerConfig(version, **args)  # the JSON sent to /containers/create
    host = body["HostConfig"]
    assert host["Binds"] == [f"{tmp_path}:/data/nanochat:rw"]
    assert host["Init"] is True and host["ShmSize"] == 16 * 1024**3
    assert host["DeviceRequests"] == [
        {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert {"Name": "memlock", "Soft": -1, "Hard": -1} in host["Ulimits"]
    assert f"HF_TOKEN={HF}" in body["Env"] and "NANOCHAT_BASE_DIR=/data/nanochat" in body["Env"]
    assert body["Cmd"] == spec["command"] and body["Image"] == spec["image"]
    assert body["WorkingDir"] == "/app" and body["User"] == spec["user"]
    assert body["Labels"] == {"nanochat.stage": "tokenizer"}
    assert (body["Tty"], body["OpenStdin"]) == (False, False)


def test_cli_argv_mirrors_the_spec(tmp_path):
    spec = spec_for(tmp_path, gpus=False)
    argv = docker_backend.cli_argv(spec)
    assert argv[:4] == ["docker", "run", "--rm", "--init"]
    text = shlex.join(argv)
    for piece in (
        "--shm-size 16g",
        f"-v {tmp_path}:/data/nanochat:rw",
        "-w /app",
        f"--user {os.getuid()}:{os.getgid()}",
        "--ulimit stack=67108864:67108864",
        f"--name {spec['name']}",
        "-e NANOCHAT_BASE_DIR=/data/nanochat",
        "-e HOME=/tmp",
    ):
        assert piece in text
    tail = [spec["image"], *spec["command"]]
    assert argv[-len(tail) :] == tail
    interactive = docker_backend.cli_argv(spec, interactive=True)
    assert interactive[-len(tail) - 1 :] == ["-it", *tail]
    assert "-it" not in argv


def test_the_web_stage_listens_inside_and_is_published_on_localhost(tmp_path):
    the_plan = docker_plan(tmp_path, stage="chat-web")
    spec = docker_backend.container_spec(the_plan, "nanochat:0123456789ab", False, {})
    assert spec["command"] == [
        *the_plan.command.argv,
        "--host=0.0.0.0",
        "--port=8000",
        "--allowed-hosts=localhost",  # published on 127.0.0.1: other Host names are refused
    ]
    assert spec["ports"] == {"8000/tcp": ("127.0.0.1", 8000)}
    assert "-p 127.0.0.1:8000:8000" in shlex.join(docker_backend.cli_argv(spec))
    assert "ports" not in spec_for(tmp_path, gpus=False)  # batch stages publish nothing


# --- secrets --------------------------------------------------------------------------------


def test_secrets_reach_the_container_but_are_never_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    monkeypatch.setenv("HF_TOKEN", HF)
    the_plan = docker_plan(tmp_path)
    secrets = load_secrets()
    spec = docker_backend.container_spec(the_plan, "nanochat:0123456789ab", True, secrets)
    assert spec["environment"]["WANDB_API_KEY"] == WANDB
    assert spec["environment"]["HF_TOKEN"] == HF
    argv = docker_backend.cli_argv(spec)
    shown = docker_backend.describe(the_plan)
    for text in (shlex.join(argv), shown):
        assert WANDB not in text and HF not in text
    # By name: docker run takes the value from the caller's environment.
    for name in ("WANDB_API_KEY", "HF_TOKEN"):
        assert argv[argv.index(name) - 1] == "-e"
    assert "-e HF_TOKEN " in shown and "-e WANDB_API_KEY " in shown


# --- describe (the dry run) ----------------------------------------------------------------


@pytest.mark.parametrize("buildx", [True, False])
def test_describe_names_the_build_then_the_run(tmp_path, monkeypatch, buildx):
    """BuildKit where the CLI has buildx, else the classic builder: the line says which."""
    monkeypatch.setattr(docker_backend, "_has_buildx", lambda: buildx)
    the_plan = docker_plan(tmp_path)
    first, second = docker_backend.describe(the_plan).splitlines()
    tag = docker_image.image_tag()
    assert first == (
        f"# image {tag} is built first when missing: DOCKER_BUILDKIT={int(buildx)} docker build "
        f"-f docker/Dockerfile -t {tag} {shlex.quote(str(REPO))}"
    )
    argv = shlex.split(second)
    assert argv[:2] == ["docker", "run"]
    assert argv[-(len(the_plan.command.argv) + 1) :] == [tag, *the_plan.command.argv]


def test_describe_asks_for_gpus_when_this_machine_has_them(tmp_path, monkeypatch):
    """The GPU decision is local.visible_gpus(), which reads nvidia-smi: a stand-in
    nvidia-smi listing one GPU plays a GPU machine (no engine needed for a dry run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    the_plan = docker_plan(tmp_path / "base")
    if local.visible_gpus() == 0:
        assert "--gpus" not in docker_backend.describe(the_plan)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert local.visible_gpus() == 1
    assert " --gpus all " in docker_backend.describe(the_plan)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "--gpus" not in docker_backend.describe(the_plan)


def test_make_dry_run_prints_docker_run_ending_with_the_local_command():
    local_run = run_cli(["make", "tokenizer", "PRESET=tiny", "DRY_RUN=1"])
    docker_run = run_cli(["make", "tokenizer", "PRESET=tiny", "BACKEND=docker", "DRY_RUN=1"])
    assert local_run.returncode == 0, local_run.stderr
    assert docker_run.returncode == 0, docker_run.stderr
    local_command = local_run.stdout.strip().splitlines()[-1]
    assert local_command.startswith("python -m scripts.tok_train")
    lines = docker_run.stdout.strip().splitlines()
    assert lines[0].startswith("# image nanochat:")
    run_line = lines[-1]
    assert run_line.startswith("docker run --rm --init ")
    assert run_line.endswith(f" {local_command}")
    assert "-v " in run_line and ":/data/nanochat:rw" in run_line
    assert "NANOCHAT_BASE_DIR=/data/nanochat" in docker_run.stderr


# --- the image tag --------------------------------------------------------------------------


def make_repo(root: Path, git: bool = True) -> Path:
    """A tiny build context: Dockerfile, our .dockerignore, sources; no .gitignore, so the
    ignored files below are left out by .dockerignore alone."""
    files = {
        "docker/Dockerfile": "FROM scratch\nCOPY . .\n",
        ".dockerignore": (REPO / ".dockerignore").read_text(),
        "pyproject.toml": "[project]\nname = 'x'\n",
        "uv.lock": "version = 1\n",
        "nanochat/__init__.py": "",
        "scripts/train.py": "print('hi')\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run([*GIT, "-C", str(root), "add", "-A"], check=True)
        subprocess.run([*GIT, "-C", str(root), "commit", "-qm", "init"], check=True)
    return root


def test_dockerignore_subset():
    rules = docker_image.dockerignore_rules(REPO)
    ignored = [
        ".venv/lib/site.py",
        ".git/HEAD",
        ".env",
        "nanochat/__pycache__/common.cpython-311.pyc",
        "__pycache__/x.pyc",
        "nanochat.egg-info/PKG-INFO",
        "test-artifacts/run/log",
        ".devdeps/bin/tool",  # what Modal would otherwise upload with the context
        "wandb/run-1/files/output.log",
        ".env.local",
        ".env.production",
    ]
    kept = ["nanochat/common.py", "docker/Dockerfile", "uv.lock", "docs/.env.example", "x.envy"]
    assert [p for p in ignored if not docker_image.is_ignored(p, rules)] == []
    assert [p for p in kept if docker_image.is_ignored(p, rules)] == []
    exceptions = [(False, ("data",)), (True, ("data", "keep.txt")), (False, ("*.log",))]
    assert docker_image.is_ignored("data/big.bin", exceptions)
    assert not docker_image.is_ignored("data/keep.txt", exceptions)
    assert docker_image.is_ignored("run.log", exceptions)
    assert not docker_image.is_ignored("logs/run.log", exceptions)  # anchored at the root


def test_image_tag_follows_the_build_inputs_only(tmp_path):
    repo = make_repo(tmp_path / "repo")
    tag = docker_image.image_tag(repo)
    assert len(tag) == len("nanochat:") + 12 and tag.startswith("nanochat:")
    int(tag.split(":")[1], 16)
    assert docker_image.image_tag(repo) == tag  # deterministic

    # Ignored by .dockerignore: not in the context, so no new tag.
    (repo / ".venv").mkdir()
    (repo / ".venv" / "x").write_text("1")
    (repo / ".env").write_text("HF_TOKEN=abc\n")
    (repo / "nanochat" / "__pycache__").mkdir()
    (repo / "nanochat" / "__pycache__" / "m.pyc").write_bytes(b"\0")
    assert docker_image.image_tag(repo) == tag
    (repo / ".venv" / "x").write_text("2")
    (repo / ".env").write_text("HF_TOKEN=xyz\n")
    assert docker_image.image_tag(repo) == tag
    assert ".env" not in docker_image.build_inputs(repo)

    seen = {tag}
    for name in ("scripts/train.py", "docker/Dockerfile", "pyproject.toml", "uv.lock"):
        path = repo / name
        original = path.read_text()
        path.write_text(original + "# changed\n")
        changed = docker_image.image_tag(repo)
        assert changed not in seen, f"a change to {name} kept the tag"
        seen.add(changed)
        path.write_text(original)
        assert docker_image.image_tag(repo) == tag, f"restoring {name} did not restore it"

    (repo / "scripts" / "new.py").write_text("")  # untracked but in the context
    assert docker_image.image_tag(repo) not in seen
    (repo / "scripts" / "new.py").unlink()
    (repo / "scripts" / "train.py").chmod(0o755)  # the mode is copied into the image too
    assert docker_image.image_tag(repo) not in seen
    (repo / "scripts" / "train.py").unlink()  # deleted but still tracked: no crash
    assert docker_image.image_tag(repo) not in seen


def test_the_tag_follows_the_context_not_gits_ignore_rules(tmp_path):
    """The engine (and Modal) send what .dockerignore leaves in, whatever .gitignore says:
    a file git ignores but the context holds must change the tag, since it changes the
    image; one both ignore must not."""
    repo = make_repo(tmp_path / "repo")
    (repo / ".gitignore").write_text("notes/\n.devdeps/\n")
    tag = docker_image.image_tag(repo)
    (repo / "notes").mkdir()
    (repo / "notes" / "todo.txt").write_text("in the context, ignored by git")
    assert "notes/todo.txt" in docker_image.build_inputs(repo)
    assert docker_image.image_tag(repo) != tag
    (repo / "notes" / "todo.txt").unlink()
    (repo / ".devdeps").mkdir()
    (repo / ".devdeps" / "tool").write_text("ignored by both")
    assert docker_image.image_tag(repo) == tag


def test_build_args_change_the_tag_and_reach_the_build(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "repo")
    plain = docker_image.image_tag(repo)
    monkeypatch.setenv(docker_image.BUILD_ARGS_ENV, "BASE_IMAGE=mirror/cuda:13 SYNC_FLAGS='-a -b'")
    assert docker_image.build_args() == {"BASE_IMAGE": "mirror/cuda:13", "SYNC_FLAGS": "-a -b"}
    assert docker_image.image_tag(repo) != plain  # another base is another image
    argv = docker_image.build_argv("nanochat:x", repo)
    assert argv[argv.index("--build-arg") : argv.index("-t")] == [
        "--build-arg",
        "BASE_IMAGE=mirror/cuda:13",
        "--build-arg",
        "SYNC_FLAGS=-a -b",
    ]
    for bad, message in (("BASE_IMAGE", "takes KEY=VALUE words"), ("A='x", "cannot be split")):
        monkeypatch.setenv(docker_image.BUILD_ARGS_ENV, bad)
        with pytest.raises(UsageError, match=message):
            docker_image.build_args()


def test_chat_cli_without_a_terminal_or_a_prompt_is_refused_before_anything(tmp_path, monkeypatch):
    """A container without a keyboard would hand the REPL an empty stdin: one line, exit 2,
    before the engine is even asked; from a terminal it runs as docker run -it."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    the_plan = plan(
        "chat-cli", backend="docker", preset="tiny", dry_run=True, base_dir=str(tmp_path)
    )
    with pytest.raises(UsageError, match="reads your keyboard and this is no terminal"):
        docker_backend.execute(the_plan, client=object())  # no engine call happens
    assert "-it nanochat:" in docker_backend.describe(the_plan)
    prompted = plan(
        "chat-cli", backend="docker", preset="tiny", dry_run=True, base_dir=str(tmp_path),
        args="-p Hello",
    )  # fmt: skip
    assert " -it " not in docker_backend.describe(prompted)


def test_image_tag_without_git_matches_the_checkout(tmp_path):
    with_git = make_repo(tmp_path / "a")
    plain = make_repo(tmp_path / "b", git=False)
    (plain / ".venv").mkdir()
    (plain / ".venv" / "big").write_text("ignored")
    assert docker_image.build_inputs(with_git) == docker_image.build_inputs(plain)
    assert docker_image.image_tag(with_git) == docker_image.image_tag(plain)
    assert "docker/Dockerfile" in docker_image.build_inputs(plain)


def test_image_tag_of_this_repository_is_stable():
    tag = docker_image.image_tag()
    assert tag == docker_image.image_tag()
    inputs = docker_image.build_inputs()
    # Every launcher module the containers import is in the image (COPY . .), new ones too.
    backends = {f"backends/{p.name}" for p in (REPO / "backends").glob("*.py")}
    assert {"docker/Dockerfile", "pyproject.toml", "backends/docker_image.py"} <= set(inputs)
    assert backends <= set(inputs)
    assert not [p for p in inputs if p.startswith((".venv/", ".git/", ".env"))]


# --- no engine, no SDK ------------------------------------------------------------------------


def test_check_ready_without_an_engine_is_one_line(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    with pytest.raises(UsageError) as caught:
        docker_backend.check_ready()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot reach the Docker engine (")
    assert "/nonexistent.sock" in message and "BACKEND=local" in message


def test_invoke_without_an_engine_exits_2_with_one_line():
    result = run_cli(
        ["invoke", "tokenizer", "--backend", "docker", "--preset", "tiny"],
        env={"DOCKER_HOST": "unix:///nonexistent.sock"},
    )
    assert result.returncode == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: cannot reach the Docker engine")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("action", ["build", "shell"])
def test_make_docker_build_and_shell_without_an_engine(action):
    result = run_cli(
        [sys.executable, "-m", "backends.docker_backend", action],
        env={"DOCKER_HOST": "unix:///nonexistent.sock"},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: cannot reach the Docker engine (no socket at unix:///nonexistent.sock): "
        "start Docker or use BACKEND=local"
    ]


def test_a_failed_build_is_one_line_with_the_exit_code(monkeypatch):
    """A missing image is built with the docker CLI; with no engine to build on, the CLI
    fails and the error names its exit code (the client here only answers 'no such image')."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed here")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")

    class NoImages:
        class images:  # noqa: N801 - the SDK's attribute name
            @staticmethod
            def get(tag):
                raise docker.errors.ImageNotFound(f"No such image: {tag}")

    with pytest.raises(UsageError) as caught:
        docker_backend.ensure_image(NoImages(), "nanochat:000000000000")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("docker build of nanochat:000000000000 failed with exit code ")
    assert int(message.split("exit code ")[1].split()[0]) != 0


# Plays "the docker package is not installed": importing it fails, or (`shadow`) finds what
# Python finds then from the repository root: our docker/ folder, as a namespace package.
PROBE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] != "docker":
                return None
            if {shadow!r} and name == "docker":
                return importlib.machinery.PathFinder.find_spec(name, [{repo!r}])
            raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, {repo!r})
    from backends import docker_backend
    from backends.planning import plan
    from nanochat.common import UsageError
    for call in (docker_backend.check_ready,
                 lambda: docker_backend.describe(plan("tokenizer", backend="docker",
                                                      preset="tiny", dry_run=True))):
        try:
            call()
        except UsageError as exc:
            print(exc)
    print([m for m in sys.modules if m.startswith("docker.")])
""")


@pytest.mark.parametrize("shadow", [False, True])
def test_without_the_sdk_the_module_imports_and_errors_are_one_line(shadow):
    result = run_cli([sys.executable, "-c", PROBE.format(shadow=shadow, repo=str(REPO))])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [docker_backend.NO_SDK, docker_backend.NO_SDK, "[]"]


# --- running: a stand-in engine, then a real one ------------------------------------------


class StandInContainer:
    """Answers the SDK calls execute() makes, the way the engine would, and records them.
    Its log stream sends us the given signals halfway, then ends once each of them has
    reached the engine as a stop or kill request."""

    def __init__(self, signals: list[int]):
        self.signals = signals
        self.calls: list[tuple] = []

    def start(self):
        self.calls.append(("start",))

    def logs(self, stream, follow):
        assert (stream, follow) == (True, True)
        yield b"step 1\n"
        for signum in self.signals:
            assert callable(signal.getsignal(signum)), "no handler: the signal would end pytest"
            os.kill(os.getpid(), signum)
        deadline = time.monotonic() + 10
        while len([c for c in self.calls if c[0] in ("stop", "kill")]) < len(self.signals):
            assert time.monotonic() < deadline, f"signals never reached the engine: {self.calls}"
            time.sleep(0.01)
        yield b"saved, bye\n"

    def wait(self):
        return {"StatusCode": 143 if self.signals else 0, "Error": None}

    def stop(self, timeout):
        self.calls.append(("stop", timeout))

    def kill(self):
        self.calls.append(("kill",))

    def remove(self, force):
        self.calls.append(("remove", force))


class StandInEngine:
    """client.images.get finds the image; client.containers.create hands out the container
    (after sending us a signal, when asked: a Ctrl-C before the stage started)."""

    def __init__(self, container, signal_on_create=None):
        self.container = container
        self.signal_on_create = signal_on_create
        self.created: dict = {}
        self.images = self
        self.containers = self

    def get(self, tag):
        return tag

    def create(self, **spec):
        self.created = spec
        if self.signal_on_create:
            os.kill(os.getpid(), self.signal_on_create)
        return self.container


@pytest.mark.parametrize(
    "signals, code",
    [([], 0), ([signal.SIGTERM], 128 + signal.SIGTERM), ([signal.SIGINT, signal.SIGTERM], 130)],
)
def test_execute_streams_forwards_signals_and_removes(tmp_path, capfd, monkeypatch, signals, code):
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    container = StandInContainer(signals)
    engine = StandInEngine(container)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    the_plan = docker_plan(tmp_path / "base")
    assert docker_backend.execute(the_plan, client=engine) == code
    out, err = capfd.readouterr()
    assert out == "step 1\nsaved, bye\n"
    assert f"[nanochat] docker: tokenizer in {docker_image.image_tag()}: python -m " in err
    assert engine.created["command"] == the_plan.command.argv
    assert engine.created["environment"]["WANDB_API_KEY"] == WANDB
    assert "secrets passed: WANDB_API_KEY (values hidden)" in err and WANDB not in out + err
    assert (tmp_path / "base").is_dir()  # made by us, not by the engine as root
    requests = {("stop", 30), ("kill",)} if len(signals) == 2 else {("stop", 30)}
    assert container.calls[0] == ("start",) and container.calls[-1] == ("remove", True)
    assert set(container.calls[1:-1]) == (requests if signals else set())
    assert ("stopping " in err) == bool(signals)
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_before_the_stage_starts_removes_the_unstarted_container(tmp_path):
    container = StandInContainer([])
    engine = StandInEngine(container, signal_on_create=signal.SIGINT)
    the_plan = docker_plan(tmp_path / "base")
    assert docker_backend.execute(the_plan, client=engine) == 128 + signal.SIGINT
    assert container.calls == [("remove", True)]
