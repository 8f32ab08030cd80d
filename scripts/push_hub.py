"""Stage push-hub: upload an exported model folder to the Hugging Face Hub.

    make push-hub REPO=you/my-nanochat              # the newest export, private
    make push-hub REPO=you/my-nanochat DEST=sft-d20 ARGS=--public

Needs ``HF_TOKEN`` (a write token) from the environment or ``.env``: it travels to every
backend as a secret, never printed. Without it the stage stops in one line before reading
anything. The repository is created when missing (private unless ``--public``) and the
folder ``make export`` wrote becomes its content in one commit through ``huggingface_hub``
(files of an older upload that the folder lacks are deleted; ``HF_ENDPOINT`` points it at a
mirror). A refusal by the Hub (a bad token, no write access) is one line, exit 1.
``--dest`` picks the folder (relative paths are under BASE_DIR/export); by default the
newest export there is, of ``--source`` when given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from nanochat.common import (
    CHECKPOINT_KINDS,
    CliParser,
    StageFailed,
    UsageError,
    base_dir,
    hub_repo_problem,
    log,
    one_line,
    run_main,
)
from nanochat.export import EXPORT_DIR

TOKEN_ENV = "HF_TOKEN"


def repo_id(text: str) -> str:
    """argparse type: ``owner/name`` as the Hub spells repository ids."""
    problem = hub_repo_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.push_hub",
        description="Upload an exported model folder to the Hugging Face Hub (stage push-hub).",
    )
    parser.add_argument(
        "--repo", type=repo_id, required=True, help="the Hub repository, owner/name"
    )
    parser.add_argument(
        "--dest",
        help="the exported folder (relative paths are under BASE_DIR/export; default: the "
        "newest folder there)",
    )
    parser.add_argument(
        "-i",
        "--source",
        choices=CHECKPOINT_KINDS,
        help="default folder: the newest export of this kind",
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="make the repository public (a new one is private unless this is given; an "
        "existing private one is made public; an existing public one stays public)",
    )
    parser.add_argument("--message", default="Upload a nanochat export", help="the commit message")
    return parser


def pick_folder(base: Path, dest: str | None, source: str | None) -> Path:
    """The folder to upload: ``dest``, or the newest export (of ``source``); UsageError
    naming what to run when there is none."""
    from nanochat.export.hf_folder import is_export

    root = base / EXPORT_DIR
    if dest is not None:
        folder = root / Path(dest).expanduser()
        if not is_export(folder):
            raise UsageError(f"{folder} is not a nanochat export: run `make export` first")
        return folder
    prefix = f"{source}-" if source else ""
    # Hidden folders are an export's work in progress (or one a crash left): never uploaded.
    found = [
        p
        for p in (root.glob(f"{prefix}*") if root.is_dir() else [])
        if not p.name.startswith(".") and p.is_dir() and is_export(p)
    ]
    if not found:
        what = f"{source} " if source else ""
        raise UsageError(f"no {what}export under {root}: run `make export` first")
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(
            f"{TOKEN_ENV} is not set: put a write token (huggingface.co/settings/tokens) in "
            "the environment or .env"
        )
    if importlib.util.find_spec("huggingface_hub") is None:
        raise UsageError("push-hub needs huggingface_hub: pip install -e '.[export]'")
    folder = pick_folder(base_dir(), args.dest, args.source)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        upload(folder, args.repo, args.public, args.message, token)
    except HfHubHTTPError as exc:  # a refused token, no write access, the network
        raise StageFailed(f"the Hub refused the upload to {args.repo}: {one_line(exc)}") from None
    return 0


def upload(folder: Path, repo: str, public: bool, message: str, token: str) -> None:
    """Create ``repo`` when missing (private unless ``public``), make it public when asked,
    and commit ``folder`` as the repository's whole content: files the folder no longer has
    (an older export's shards, another dtype's weights) are deleted in the same commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(token=token)
    try:
        private = api.repo_info(repo, repo_type="model").private
    except RepositoryNotFoundError:
        private = None
    if private is None:
        log(f"creating {repo} ({'public' if public else 'private'})")
        api.create_repo(repo, private=not public, repo_type="model")
    elif public and private:
        log(f"{repo} exists and is private: making it public (--public)")
        api.update_repo_settings(repo, private=False, repo_type="model")
    else:
        log(f"{repo} exists ({'private' if private else 'public'}); its visibility stays")
    log(f"uploading {folder} to {repo}")
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=str(folder),
        commit_message=message,
        repo_type="model",
        delete_patterns=["*"],
    )
    log(f"uploaded: {getattr(commit, 'commit_url', repo)}")


if __name__ == "__main__":
    run_main(main)
