"""BACKEND=docker for real: docker/Dockerfile built by a real engine, stages in containers.

The image is the project's own Dockerfile, unchanged, built on a local stand-in of its CUDA
base (tests/docker_standin.py says how the test image differs and why). Then, through the
front door a user types: the smoke preset's data, tokenizer and pretraining stages in
containers (exit codes, artifacts owned by the caller), a bad flag (exit 2 from inside the
container, one line), chat-web answering the official openai client on 127.0.0.1 and
Ctrl-C stopping and removing its container, and what the README promises being in the
image (wandb, torchao, Rust).

The engine is started when none runs (as root, Debian's docker.io, which `make test`
installs); elsewhere the tests skip and say what was not run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import docker_standin
import pytest
from conftest import REPO, cli_env, run_cli
from helpers.waiting import wait_for

from backends import docker_backend, docker_image

pytestmark = pytest.mark.first  # the image build is long: start it before the rest
LABEL = docker_backend.STAGE_LABEL


@pytest.fixture(scope="module")
def image():
    """(client, tag, build args): the test image, built through the backend's own path."""
    client = docker_standin.engine()
    args = docker_standin.build_args(client)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(docker_image.BUILD_ARGS_ENV, args)
        tag = docker_image.image_tag()
        docker_backend.ensure_image(client, tag)
    base = args.split()[0].partition("=")[2]
    docker_standin.prune_old_test_images(client, keep={tag, base})
    yield client, tag, args
    client.close()


@pytest.fixture(scope="module")
def smoke(image, tmp_path_factory):
    """`make download tokenizer pretrain PRESET=smoke BACKEND=docker` into a fresh BASE_DIR,
    once (the stages that make a model to serve; tests/e2e/test_readme.py runs the whole smoke
    speedrun locally, the same commands)."""
    client, _, args = image
    base = tmp_path_factory.mktemp("docker") / "base"
    result = run_cli(
        ["make", "download", "tokenizer", "pretrain", "PRESET=smoke", "BACKEND=docker"]
        + [f"BASE_DIR={base}"],
        env={docker_image.BUILD_ARGS_ENV: args},
        timeout=1200,
    )
    # Containers of these stages still there (any with this BASE_DIR mounted; those of other
    # tests, which pytest may run at the same time, have theirs).
    left_over = [
        c.name
        for c in client.containers.list(all=True, filters={"label": LABEL})
        if any(m.get("Source") == str(base) for m in c.attrs.get("Mounts", []))
    ]
    return base, result, left_over


def test_stages_run_in_containers_and_leave_the_callers_files(smoke):
    base, result, left_over = smoke
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("download", "tokenizer", "pretrain"):
        assert f"[nanochat] docker: {stage} in nanochat:" in result.stderr
    report = base / "report" / "pretrain.md"
    checkpoints = list(base.rglob("model_*.pt"))
    assert report.is_file() and checkpoints
    # Written by the container as the caller (its uid:gid), never as root behind our back.
    for path in (report, base / "tokenizer" / "tokenizer.json", *checkpoints):
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path
    assert not left_over  # every container was removed


def test_export_in_a_container_writes_the_folder_as_the_caller(image, smoke):
    """`make export BACKEND=docker`: the folder lands under BASE_DIR/export, written as the
    caller, after transformers loaded it back inside the container (HOME=/tmp holds its
    module cache)."""
    client, _, args = image
    base, result, _ = smoke
    assert result.returncode == 0, result.stderr[-3000:]
    export = run_cli(
        ["make", "export", "PRESET=smoke", "BACKEND=docker", "DEST=smoke-base", f"BASE_DIR={base}"],
        env={docker_image.BUILD_ARGS_ENV: args},
        timeout=600,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "max |logit difference|" in export.stdout + export.stderr
    folder = base / "export" / "smoke-base"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    for path in folder.iterdir():
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path


def test_two_nodes_in_containers_on_the_hosts_network(image, smoke, tmp_path):
    """`make pretrain PRESET=smoke BACKEND=docker NODES=2` twice on this machine: each node's
    container shares the host's network (--network host), so node 1 reaches node 0's
    rendezvous at 127.0.0.1; both write into one BASE_DIR, one checkpoint per save."""
    _, _, args = image
    base = tmp_path / "base"
    for entry in ("base_data", "tokenizer"):
        shutil.copytree(smoke[0] / entry, base / entry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            f"make pretrain PRESET=smoke BACKEND=docker NODES=2 NODE_RANK={rank} "
            f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}".split()
            + [f"BASE_DIR={base}"],
            cwd=REPO,
            env=cli_env({docker_image.BUILD_ARGS_ENV: args, "OMP_NUM_THREADS": "1"}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (1, 0)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, (out + err)[-3000:]
    meta = json.loads((base / "base_checkpoints" / "d4" / "meta_000006.json").read_text())
    assert meta["world_size"] == 2
    assert set(meta["files"]) == {"model_000006.pt", "rank_000006_r0.pt", "rank_000006_r1.pt"}


def test_a_bad_flag_fails_inside_the_container_with_one_line(image, tmp_path):
    _, _, args = image
    result = run_cli(
        ["make", "pretrain", "PRESET=smoke", "BACKEND=docker", f"BASE_DIR={tmp_path / 'b'}"]
        + ["ARGS=--no-such-flag"],
        env={docker_image.BUILD_ARGS_ENV: args},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr  # the container's output arrives on stdout
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--no-such-flag" in errors[0], output[-2000:]
    assert not (tmp_path / "b" / "base_checkpoints").exists()


def _answers(server: subprocess.Popen, url: str) -> bool:
    """Whether ``url`` answers 200 yet; fails if ``server`` (which should serve it) ended."""
    assert server.poll() is None, server.stdout.read()[-3000:]
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except OSError:
        return False


def test_chat_web_answers_the_openai_client_and_ctrl_c_removes_it(image, smoke):
    from openai import OpenAI

    client, _, args = image
    base, result, _ = smoke
    assert result.returncode == 0, "the smoke stages failed (see their test)"
    env = cli_env({docker_image.BUILD_ARGS_ENV: args})
    server = subprocess.Popen(
        ["make", "chat-web", "PRESET=smoke", "BACKEND=docker", f"BASE_DIR={base}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: SIGINT below is a terminal's Ctrl-C
    )
    try:
        health = "http://127.0.0.1:8000/health"
        wait_for(lambda: _answers(server, health), "chat-web to come up", 180, interval=1)
        api = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0)
        reply = api.chat.completions.create(
            model="nanochat", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.choices and reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens >= 1
        # The container: the image, the caller's uid, published on 127.0.0.1 only, and no
        # GPU request on a machine without GPUs (`--gpus all` fails there).
        (container,) = client.containers.list(filters={"label": f"{LABEL}=chat-web"})
        host = container.attrs["HostConfig"]
        assert container.attrs["Config"]["Image"].startswith("nanochat:")
        assert container.attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
        assert host["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8000"}]}
        assert not host.get("DeviceRequests")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    assert server.returncode != 0  # stopped by Ctrl-C, and make says so
    assert "[nanochat] docker: stopping nanochat-chat-web-" in out, out[-3000:]
    assert not client.containers.list(all=True, filters={"label": f"{LABEL}=chat-web"})


def test_killing_the_launchers_group_stops_and_removes_its_container(image, smoke):
    """`setsid make chat-web BACKEND=docker; kill -9 -<pgid>`: nothing of ours is left to
    forward a signal, yet the watchdog stops the container and removes it."""
    client, _, args = image
    base, result, _ = smoke
    assert result.returncode == 0, "the smoke stages failed (see their test)"
    make = subprocess.Popen(
        ["make", "chat-web", "PRESET=smoke", "BACKEND=docker", f"BASE_DIR={base}"],
        cwd=REPO,
        env=cli_env({docker_image.BUILD_ARGS_ENV: args}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    chat_web = {"label": f"{LABEL}=chat-web"}

    def running():
        assert make.poll() is None, "make chat-web ended before its container ran"
        return client.containers.list(filters={**chat_web, "status": "running"})

    wait_for(running, "a running chat-web container", 180, interval=0.5)
    os.killpg(make.pid, signal.SIGKILL)
    make.wait()
    wait_for(
        lambda: not client.containers.list(all=True, filters=chat_web),
        "the orphaned container to be removed",
        120,
        interval=0.5,
    )


def test_the_image_has_what_the_readme_promises(image):
    client, tag, _ = image
    probe = (
        "import os, shutil, wandb, torchao.float8, tiktoken, rustbpe, torch, transformers, "
        "safetensors, huggingface_hub; "
        "print(torch.__version__, shutil.which('cargo') is not None, "
        "os.environ.get('OMP_NUM_THREADS'), os.environ['NANOCHAT_BASE_DIR'])"
    )
    out = client.containers.run(tag, ["python", "-c", probe], remove=True).decode()
    version, cargo, threads, base = out.split()
    assert version.startswith(docker_standin.locked_torch()[0])
    assert (cargo, threads, base) == ("True", "None", "/data/nanochat")


def test_chat_cli_in_a_terminal_is_a_real_repl(image, smoke):
    """From a terminal, `make chat-cli BACKEND=docker` runs as docker run -it: the REPL
    reads what is typed and answers, /quit ends it with 0, and no container is left."""
    import pty
    import select

    client, _, args = image
    base, result, _ = smoke
    assert result.returncode == 0, "the smoke stages failed (see their test)"
    env = cli_env({docker_image.BUILD_ARGS_ENV: args, "TERM": "dumb", "NO_COLOR": "1"})
    controller, terminal = pty.openpty()
    session = subprocess.Popen(
        ["make", "chat-cli", "PRESET=smoke", "BACKEND=docker", f"BASE_DIR={base}"]
        + ["ARGS=--max-tokens=8"],  # short replies: the test waits for each one
        cwd=REPO,
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    seen = b""

    def read_until(text: bytes, seconds: float) -> None:
        """Read until ``text`` appears in what arrives from now on."""
        nonlocal seen
        start = len(seen)
        deadline = time.monotonic() + seconds
        while text not in seen[start:]:
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            ready, _, _ = select.select([controller], [], [], 1)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:  # the session ended before the text came
                    pytest.fail(f"the REPL ended before {text!r}: {seen[-2000:]!r}")

    try:
        read_until(b"you> ", 120)
        os.write(controller, b"Hello there\r")
        read_until(b"Hello there\r\n", 30)  # the terminal's echo of the whole line
        read_until(b"you> ", 60)  # answered, and asking again: a real multi-turn REPL
        assert seen.count(b"you> ") >= 2
        os.write(controller, b"/quit\r")
        assert session.wait(timeout=60) == 0
    finally:
        if session.poll() is None:
            os.killpg(session.pid, signal.SIGKILL)
            session.wait()
        os.close(controller)
    assert not client.containers.list(all=True, filters={"label": f"{LABEL}=chat-cli"})
