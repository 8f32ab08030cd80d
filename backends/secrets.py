"""Secrets a stage may use (wandb, Hugging Face downloads), from the environment or ``.env``.

Every backend passes the same secrets: the local backend adds them to the child's environment,
docker as container environment, Modal as a ``modal.Secret``. Their values are never printed:
dry runs and logs name them only. A variable set in the environment wins over ``.env``.
All of them are optional; training runs without (wandb off, public datasets).
NANOCHAT_API_KEY makes chat-web's API ask for ``Authorization: Bearer <key>``.
HF_ENDPOINT (a Hugging Face mirror for the task-data stage) is no secret but travels the same
way, so a mirror set here reaches the stage on every backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

REPO_ROOT = Path(__file__).resolve().parents[1]
DOTENV = REPO_ROOT / ".env"
# Another file to read instead of the repository's .env (the tests point it at nothing, so
# a user's real .env never reaches them).
DOTENV_ENV = "NANOCHAT_DOTENV"
API_KEY_NAME = "NANOCHAT_API_KEY"
SECRET_NAMES = ("WANDB_API_KEY", "HF_TOKEN", API_KEY_NAME, "HF_ENDPOINT")


def dotenv_path() -> Path:
    return Path(os.environ.get(DOTENV_ENV) or DOTENV)


def load_secrets(
    dotenv: Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The secrets that are set, by name (empty values count as unset)."""
    environ = os.environ if environ is None else environ
    dotenv = dotenv_path() if dotenv is None else dotenv
    from_file = dotenv_values(dotenv) if dotenv.is_file() else {}
    found = {}
    for name in SECRET_NAMES:
        value = environ.get(name) or from_file.get(name)
        if value:
            found[name] = value
    return found


def describe(secrets: Mapping[str, str]) -> str:
    """A loggable line: names only."""
    if not secrets:
        return "no secrets set (" + ", ".join(SECRET_NAMES) + " are optional)"
    return "secrets passed: " + ", ".join(sorted(secrets)) + " (values hidden)"
