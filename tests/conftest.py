"""Shared test fixtures: every test gets its own artifacts root, never ~/.cache/nanochat,
and nothing of the user's environment reaches a test: the knob variables (BASE_DIR, PRESET,
DEPTH, ARGS, ...), nanochat's own variables, the secrets and the repository's .env are
cleared when this file is imported, before any test or fixture runs."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
sys.path.insert(0, str(REPO))

from backends.knobs import KNOBS  # noqa: E402
from backends.secrets import DOTENV_ENV, SECRET_NAMES  # noqa: E402

# Make variables of our Makefile that a user may export, besides the knobs.
MAKE_VARIABLES = ("EXTRAS", "VENV", "DEST", "OMP_NUM_THREADS", "MODAL_IS_REMOTE")
# Hugging Face's own cache and token locations (each would win over the HF_HOME set below).
HF_VARIABLES = (
    "HF_MODULES_CACHE", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
    "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "XDG_CACHE_HOME",
)  # fmt: skip
USER_VARIABLES = sorted(
    {knob.make_var for knob in KNOBS}
    | set(SECRET_NAMES)
    | set(MAKE_VARIABLES)
    | set(HF_VARIABLES)
    | {name for name in os.environ if name.startswith("NANOCHAT_")}
)


def _clear_user_environment() -> None:
    for name in USER_VARIABLES:
        os.environ.pop(name, None)
    os.environ[DOTENV_ENV] = os.devnull  # never the repository's .env
    # Hugging Face's caches (transformers copies an exported modeling file there) in a
    # folder of this test run, never the user's ~/.cache/huggingface.
    hf_home = tempfile.mkdtemp(prefix="nanochat-test-hf-")
    atexit.register(shutil.rmtree, hf_home, ignore_errors=True)
    os.environ["HF_HOME"] = hf_home


_clear_user_environment()


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR per test."""
    path = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


def write_corpus(base: Path, texts: list[str], vocab: int = 300) -> None:
    """Three parquet shards of ``texts`` as dataset "toy" and a tokenizer trained on them."""
    from helpers.builders import tokenizer_for

    from nanochat.data import shards

    folder = shards.data_dir(base, "toy")
    for i, group in enumerate([texts[0::3], texts[1::3], texts[2::3]]):
        shards.write_shard(folder / shards.shard_name(i), group, row_group_size=8)
    tokenizer_for(texts, vocab, base)


def toy_texts() -> list[str]:
    from helpers.builders import word_texts

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return word_texts(words, 240, shortest=5, spread=40)


@pytest.fixture
def toy(base_dir):
    """BASE_DIR with a toy corpus and tokenizer: what a small pretraining run needs."""
    write_corpus(base_dir, toy_texts())
    return base_dir


@pytest.fixture(params=["bwrap", "guard"])
def layer(request, monkeypatch):
    """The code sandbox's layer under test, set through NANOCHAT_SANDBOX: every test that
    takes it runs once under bubblewrap (skipped, with the reason, where it cannot run) and
    once under the in-process guard."""
    from nanochat.common import UsageError
    from nanochat.inference import execution

    monkeypatch.setenv("NANOCHAT_SANDBOX", request.param)
    try:
        active = execution.active_layer()
    except UsageError as exc:
        pytest.skip(f"the bubblewrap layer was not run: {exc}")
    assert active.name == request.param
    return active


@pytest.fixture(scope="module")
def server(servers):
    """The main chat-web server of a module's ``servers`` fixture (helpers.chat_server)."""
    return servers["main"]


@pytest.fixture(scope="module")
def client(server):
    """The official openai client of ``server``: no retries, one minute per call."""
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a front-end command as a user types it: the venv's bin/ first,
    ``env`` on top. Under `make test` a nested make would inherit MAKELEVEL and print
    "Entering directory" lines: every command is a top-level one."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    }
    full_env["PATH"] = VENV_BIN + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    return full_env


def run_cli(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    """Run a front-end command (make / invoke / python -m) from the repo root."""
    return subprocess.run(
        argv, cwd=REPO, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "first: a long test the suite starts before the others")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``first`` run first: under ``-n 2`` the longest one then overlaps the
    rest of the suite instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)
