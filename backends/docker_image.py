"""The docker backend's image: its build context, its tag, its build arguments and command.

Part of the launcher (tasks.py -> backends -> scripts): BACKEND=docker runs every stage of
the pipeline (data -> tokenizer -> pretrain -> eval -> midtrain -> SFT -> RL -> chat/serve)
in a container of the image built from ``docker/Dockerfile``; ``backends/docker_backend.py``
builds it when its tag is missing and runs the containers.

The tag is ``nanochat:<12 hex>``, a hash of every file the build context holds (what
``.dockerignore`` leaves in) and of the build arguments, so unchanged inputs never rebuild
and any source, Dockerfile, pyproject.toml or uv.lock change gives a new tag.
NANOCHAT_DOCKER_BUILD_ARGS passes build arguments, e.g. ``BASE_IMAGE=<a mirror of the CUDA
image>``. Standard library only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from backends.local import REPO_ROOT
from nanochat.common import UsageError

IMAGE_NAME = "nanochat"
WORKDIR = "/app"  # the image's WORKDIR: the source and its .venv
DOCKERFILE = "docker/Dockerfile"  # relative to the repository root (the build context)
BUILD_ARGS_ENV = "NANOCHAT_DOCKER_BUILD_ARGS"  # "KEY=VALUE KEY2='a b'" for docker build


def dockerignore_rules(repo_root: Path = REPO_ROOT) -> list[tuple[bool, tuple[str, ...]]]:
    """``.dockerignore`` as (exception?, pattern components), in file order.

    The subset our file uses: plain names and paths, ``*``/``?`` globs within one component,
    ``**`` for any number of components, a trailing ``/``, ``#`` comments and ``!`` exceptions.
    Patterns are anchored at the context root, as docker reads them.
    """
    path = repo_root / ".dockerignore"
    if not path.is_file():
        return []
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = posixpath.normpath(line.lstrip("!").strip().strip("/"))
        parts = tuple(p for p in line.split("/") if p not in ("", "."))
        if parts:
            rules.append((exception, parts))
    return rules


def _matches(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """True when the pattern matches the path or one of its parent folders (a prefix of
    its components): excluding a folder excludes everything inside it."""
    if not pattern:
        return True
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _matches(pattern[1:], parts[1:])
    )


def is_ignored(relpath: str, rules: Iterable[tuple[bool, tuple[str, ...]]]) -> bool:
    """Whether ``.dockerignore`` keeps this path (relative, ``/``-separated) out of the
    context: the last rule that matches decides."""
    parts = tuple(relpath.split("/"))
    ignored = False
    for exception, pattern in rules:
        if _matches(pattern, parts):
            ignored = not exception
    return ignored


def _candidate_files(repo_root: Path, rules: list[tuple[bool, tuple[str, ...]]]) -> list[str]:
    """Every file under the root, as the engine sees the context: git's ignore rules play no
    part (the context is what ``.dockerignore`` leaves in, so the tag must be too). Ignored
    folders are not entered when no ``!`` exception could bring something inside back."""
    prune = not any(exception for exception, _ in rules)
    found = []
    for folder, dirs, files in os.walk(repo_root):
        rel_folder = Path(folder).relative_to(repo_root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [prefix + name for name in (*files, *links)]
        if prune:
            dirs[:] = [d for d in dirs if not is_ignored(prefix + d, rules)]
    return sorted(found)


def build_inputs(repo_root: Path = REPO_ROOT) -> list[str]:
    """The files (relative paths, sorted) that make up the image's build context."""
    rules = dockerignore_rules(repo_root)
    return [name for name in _candidate_files(repo_root, rules) if not is_ignored(name, rules)]


def build_args() -> dict[str, str]:
    """The build arguments NANOCHAT_DOCKER_BUILD_ARGS names (shell words of KEY=VALUE)."""
    raw = os.environ.get(BUILD_ARGS_ENV, "")
    try:
        words = shlex.split(raw)
    except ValueError as exc:
        raise UsageError(f"{BUILD_ARGS_ENV} cannot be split like a shell line: {exc}") from None
    found = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"{BUILD_ARGS_ENV} takes KEY=VALUE words, got {word!r}")
        found[key] = value
    return found


def image_tag(repo_root: Path = REPO_ROOT, args: Mapping[str, str] | None = None) -> str:
    """``nanochat:<12 hex>``: sha256 over each build input's path, kind and bytes, and the
    build arguments (another base image is another image)."""
    digest = hashlib.sha256()
    args = build_args() if args is None else args
    for key in sorted(args):
        digest.update(f"arg\0{key}\0{args[key]}\0".encode())
    for name in build_inputs(repo_root):
        path = repo_root / name
        try:
            info = path.lstat()
        except FileNotFoundError:  # tracked but deleted in the working tree: not in the context
            continue
        if os.path.islink(path):
            kind, data = "link", os.readlink(path).encode("utf-8", "surrogateescape")
        elif path.is_file():
            kind, data = ("exec" if info.st_mode & 0o111 else "file"), path.read_bytes()
        else:  # a submodule or something odd: its path alone
            kind, data = "other", b""
        header = f"{name}\0{kind}\0{len(data)}\0".encode("utf-8", "surrogateescape")
        digest.update(header)
        digest.update(data)
    return f"{IMAGE_NAME}:{digest.hexdigest()[:12]}"


def build_argv(
    tag: str, repo_root: Path = REPO_ROOT, args: Mapping[str, str] | None = None
) -> list[str]:
    """The build command, run from the repository root with DOCKER_BUILDKIT set."""
    args = build_args() if args is None else args
    arg_flags = [flag for key in sorted(args) for flag in ("--build-arg", f"{key}={args[key]}")]
    return ["docker", "build", "-f", DOCKERFILE, *arg_flags, "-t", tag, str(repo_root)]
