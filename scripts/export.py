"""Stage export: a checkpoint as a Hugging Face transformers model folder.

    python -m scripts.export                      # the most trained checkpoint there is
    python -m scripts.export -i sft --dest=my-model
    make export SOURCE=sft [DEST=folder]

Writes ``BASE_DIR/export/<kind>-<tag>/`` (or ``--dest``; a relative path is under
BASE_DIR/export, so the same command lands in the same place on every backend, on Modal the
checkpoint volume): safetensors weights, the
config and our modeling file (loaded with ``trust_remote_code=True``), the tokenizer with
the chat template, the generation config and a model card. Before the folder takes its name
transformers loads it back and its logits are compared with ours (``nanochat.export``).
Then ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, or
``make push-hub REPO=user/name``; docs/export.md says how to serve and evaluate it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    add_checkpoint_arguments,
    base_dir,
    run_main,
)
from nanochat.export import DEFAULT_DTYPE, EXPORT_DIR, EXPORT_DTYPES

NEEDS = ("transformers", "safetensors", "huggingface_hub", "tokenizers")


def build_parser() -> CliParser:
    parser = CliParser(
        prog="python -m scripts.export",
        description="Export a checkpoint as a Hugging Face transformers folder (stage export).",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--dest",
        help="folder to write, new or a previous export (replaced whole); relative paths are "
        "under BASE_DIR/export (default: BASE_DIR/export/<kind>-<tag>)",
    )
    parser.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        default=DEFAULT_DTYPE,
        help="weights' type in the folder (default: float32, the training master copy; "
        "bfloat16 halves the size)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"export needs {', '.join(missing)}: pip install -e '.[export]' (make setup "
            "installs it)"
        )
    from nanochat.export.hf_folder import export

    base = base_dir()
    dest = None if args.dest is None else base / EXPORT_DIR / Path(args.dest).expanduser()
    export(base, args.source, args.tag, args.step, dest, args.dtype)
    return 0


if __name__ == "__main__":
    run_main(main)
