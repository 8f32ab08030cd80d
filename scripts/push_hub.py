"""Stage push-hub: upload an exported model folder to the Hugging Face Hub.

    make push-hub REPO=you/my-nanochat              # the newest export, private
    make push-hub REPO=you/my-nanochat DEST=sft-d20 ARGS=--public

Needs ``HF_TOKEN`` (a write token) from the environment or ``.env``: it travels to every
backend as a secret, never printed. Without it the stage stops in one line before reading
anything. The repository is created when missing (private unless ``--public``) and the
folder ``make export`` wrote goes up in one commit through ``huggingface_hub``
(``HF_ENDPOINT`` points it at a mirror). ``--dest`` picks the folder (relative paths are
under BASE_DIR/export); by default the newest export there is, of ``--source`` when given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from nanochat.common import (
    CHECKPOINT_KINDS,
    CliParser,
    UsageError,
    base_dir,
    hub_repo_problem,
    log,
    run_main,
)

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
        "--public", action="store_true", help="create the repository public (default: private)"
    )
    parser.add_argument("--message", default="Upload a nanochat export", help="the commit message")
    return parser


def pick_folder(base: Path, dest: str | None, source: str | None) -> Path:
    """The folder to upload: ``dest``, or the newest export (of ``source``); UsageError
    naming what to run when there is none."""
    from nanochat.export.hf_folder import is_export

    if dest is not None:
        folder = base / "export" / Path(dest).expanduser()
        if not is_export(folder):
            raise UsageError(f"{folder} is not a nanochat export: run `make export` first")
        return folder
    root = base / "export"
    prefix = f"{source}-" if source else ""
    found = (
        [p for p in root.glob(f"{prefix}*") if p.is_dir() and is_export(p)] if root.is_dir() else []
    )
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
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    visibility = "public" if args.public else "private"
    log(f"uploading {folder} to {args.repo} ({visibility}, created when missing)")
    url = api.create_repo(args.repo, private=not args.public, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=args.repo, folder_path=str(folder), commit_message=args.message, repo_type="model"
    )
    log(f"uploaded: {url} (commit {getattr(commit, 'oid', '?')})")
    return 0


if __name__ == "__main__":
    run_main(main)
