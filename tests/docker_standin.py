"""A real Docker engine for the tests, and a stand-in for the image's CUDA base, so that the
tests build docker/Dockerfile itself, unchanged, and run the docker backend for real.

Why a stand-in: the test machines reach Debian's archive and PyPI but not Docker Hub, so
``nvidia/cuda:13.0.1-devel-ubuntu24.04`` cannot be pulled there. The stand-in is made here:

1. ``debootstrap --variant=minbase bookworm`` and ``docker import``: a bare Debian 12;
2. a small build on top of it (``STANDIN_DOCKERFILE``): python3 and venv, Debian's cargo
   (rustup's servers are out of reach too; the Dockerfile keeps a base's own cargo), the
   machine's CA bundle (HTTPS to PyPI goes through a TLS proxy on these machines; a user's
   machine needs nothing of the sort), and ``/app/.venv`` holding the CPU build of the torch
   release uv.lock pins (the lock's CUDA wheels are ~3 GB and need a GPU).

docker/Dockerfile is then built on it with two build arguments (the only differences):
``BASE_IMAGE=<the stand-in>`` and ``SYNC_FLAGS=--inexact --no-install-package torch ...``
(torch and its CUDA wheels; every other locked package is installed from uv.lock as in the
real image). So the test image differs from the real one in: Debian 12 instead of Ubuntu
24.04 with CUDA 13.0, Python 3.11 instead of 3.12, torch 2.13.0's CPU build instead of its
CUDA build, Debian's Rust 1.65 instead of rustup's stable. Every layer, the locked install,
the source and the commands are the real Dockerfile's.

Both images are cached by the engine under tags that hash their recipe; a fresh machine
builds them once (about 3 minutes here).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOTFS_TAG = f"nanochat-standin-rootfs:{SUITE}"
CA_IN_IMAGE = "/etc/ssl/nanochat-host-ca.crt"
STANDIN_DOCKERFILE = f"""\
FROM {ROOTFS_TAG}
COPY host-ca.crt {CA_IN_IMAGE}
ENV SSL_CERT_FILE={CA_IN_IMAGE} PIP_CERT={CA_IN_IMAGE} REQUESTS_CA_BUNDLE={CA_IN_IMAGE} \\
    CURL_CA_BUNDLE={CA_IN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv cargo \\
    && rm -rf /var/lib/apt/lists/*
COPY torch-wheel/ /tmp/torch-wheel/
RUN python3 -m venv /app/.venv \\
    && /app/.venv/bin/pip install --no-cache-dir /tmp/torch-wheel/*.whl && rm -rf /tmp/torch-wheel
"""
DOCKERD_LOG = Path(tempfile.gettempdir()) / "nanochat-test-dockerd.log"


def _tool(name: str) -> str | None:
    """A system tool, also where a user's PATH may lack /usr/sbin."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def _skip(reason: str):
    pytest.skip(f"{reason}: the image build and the containers of BACKEND=docker were not run")


def engine():
    """A docker SDK client for an engine that answers; starts ``dockerd`` when this process
    may (root, dockerd installed) and none answers; skips with the reason otherwise."""
    import docker

    def ping():
        try:
            client = docker.from_env(timeout=300)
            client.ping()
            return client
        except Exception:
            return None

    client = ping()
    if client is not None:
        return client
    dockerd = _tool("dockerd")
    if dockerd is None:
        _skip("no Docker engine answers and dockerd is not installed (apt-get install docker.io)")
    if os.getuid() != 0:
        _skip("no Docker engine answers and starting dockerd needs root")
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(
            [dockerd], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    for _ in range(60):
        time.sleep(1)
        client = ping()
        if client is not None:
            return client
    _skip(f"dockerd did not answer within 60 s (its log: {DOCKERD_LOG})")


def _has(client, tag: str) -> bool:
    import docker

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _run(argv: list[str], **kwargs) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({done.returncode}):\n{tail}")


def locked_torch() -> tuple[str, list[str]]:
    """torch's locked version, and torch plus the CUDA-only packages of the lock (torch
    pulls them in, some through cuda-toolkit's extras; nothing else needs them)."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    names = [p["name"] for p in lock["package"]]
    cuda_only = [n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    version = next(p["version"] for p in lock["package"] if p["name"] == "torch")
    return version, sorted({"torch", *cuda_only})


def _torch_wheel(version: str, into: Path) -> None:
    """The CPU build of torch ``version``: from pip's configured sources (a local wheel
    cache on these machines), else PyTorch's CPU index."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    base += ["-d", str(into), f"torch=={version}+cpu"]
    for extra in ([], ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and list(into.glob("torch-*.whl")):
            return
    _skip(f"no CPU build of torch {version} could be downloaded")


def _ca_bundle() -> Path:
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    _skip("no CA bundle found for HTTPS from the build")


def standin_base(client) -> str:
    """The stand-in base image's tag, built when the engine lacks it."""
    version, _ = locked_torch()
    recipe = f"{SUITE}\n{MIRROR}\n{version}\n{STANDIN_DOCKERFILE}"
    tag = f"nanochat-standin:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if _has(client, tag):
        return tag
    if not _has(client, ROOTFS_TAG):
        debootstrap = _tool("debootstrap")
        if debootstrap is None:
            _skip("debootstrap is not installed (apt-get install debootstrap)")
        if os.getuid() != 0:
            _skip("debootstrap (the stand-in base image) needs root")
        with tempfile.TemporaryDirectory(prefix="nanochat-rootfs-") as rootfs:
            _run([debootstrap, "--variant=minbase", SUITE, rootfs, MIRROR], timeout=900)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            _run(["docker", "import", "-", ROOTFS_TAG], stdin=tar.stdout, timeout=600)
            tar.wait()
    with tempfile.TemporaryDirectory(prefix="nanochat-standin-") as context:
        root = Path(context)
        (root / "Dockerfile").write_text(STANDIN_DOCKERFILE)
        shutil.copyfile(_ca_bundle(), root / "host-ca.crt")
        (root / "torch-wheel").mkdir()
        _torch_wheel(version, root / "torch-wheel")
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        _run(["docker", "build", "-t", tag, str(root)], env=env, timeout=1800)
    return tag


def build_args(client) -> str:
    """NANOCHAT_DOCKER_BUILD_ARGS that build docker/Dockerfile on the stand-in."""
    _, skip = locked_torch()
    flags = " ".join(["--inexact", *(f"--no-install-package {name}" for name in skip)])
    return f"BASE_IMAGE={standin_base(client)} SYNC_FLAGS='{flags}'"


def prune_old_test_images(client, keep: set[str]) -> None:
    """Remove the test images of earlier runs (each source change tags a new one; their
    shared layers stay, so the next build is quick), and stand-in bases of older recipes.
    A test image is one whose environment carries the stand-in's CA path: a real image
    never does, so a user's own images are left alone."""
    import docker

    marker = f"SSL_CERT_FILE={CA_IN_IMAGE}"
    for image in client.images.list():
        for tag in image.tags:
            ours = tag.startswith("nanochat-standin:") or (
                tag.startswith("nanochat:") and marker in (image.attrs["Config"].get("Env") or [])
            )
            if ours and tag not in keep:
                try:
                    client.images.remove(tag)
                except docker.errors.APIError:  # in use by a container: next time
                    pass
