"""Write a checkpoint as a Hugging Face model folder, check it, and put it in place at once.

Where it fits: the export stage (``scripts/export.py``, ``make export``) calls ``export``;
the push-hub stage uploads the folder it leaves. The folder holds:

- ``model.safetensors`` (shards of at most 5 GB and ``model.safetensors.index.json`` above
  that), the weights renamed by ``nanochat.export.hf_weights``;
- ``config.json`` (``NanochatFullConfig``, with ``auto_map`` pointing at the modeling file)
  and ``modeling_nanochat_full.py`` itself; ``generation_config.json`` (stops at
  ``<|assistant_end|>`` and ``<|bos|>``, greedy unless asked otherwise);
- ``tokenizer.json`` and ``tokenizer_config.json`` with the chat template
  (``nanochat.export.hf_tokenizer``);
- ``README.md``, the model card (``nanochat.export.model_card``).

Everything is written into a temp folder beside the destination. Before it takes the
destination's name, transformers loads it back (``trust_remote_code``) and its float32 logits
are compared with our model's (its weights rounded to the folder's dtype) on a few prompts,
one longer than the sliding window: a folder that does not compute what we do within
``TOLERANCE`` is never left behind, whatever its dtype. A destination that holds an export
and nothing else is replaced whole (the old one is put back if the swap fails); one that
holds anything else (notes, a git clone, another model) is refused, untouched. One export at
a time writes in a folder (a lock on it); a rerun after a kill removes what the killed one
left beside its destination.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.common import (
    StageFailed,
    UsageError,
    check_free_space,
    human_bytes,
    lock_folder,
    log,
)
from nanochat.export import DEFAULT_DTYPE, EXPORT_DIR, hf_weights
from nanochat.export.hf_tokenizer import write_tokenizer

MAX_SHARD = "5GB"
TOLERANCE = 1e-4  # max |logit difference| allowed between the folder and our model (fp32)
EXPORT_MARK = "nanochat_export"  # config.json key that marks a folder we wrote
# Every name an export holds: a folder with anything else is not ours to replace.
EXPORT_FILES = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    hf_weights.MODELING_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
)
PROMPTS = (
    "The capital of France is",
    "Crème brûlée, 東京, emoji 🙂 and numbers 12345 in one line.",
)


@dataclass(frozen=True)
class Exported:
    folder: Path
    parity: dict


def default_dest(base: Path, kind: str, tag: str) -> Path:
    """``BASE_DIR/export/<kind>-<tag>``."""
    return Path(base) / EXPORT_DIR / f"{kind}-{tag}"


def check_dest(dest: Path) -> None:
    """Refuse a destination that is a file or a link, one whose parent is not a folder, or a
    folder holding anything but an export of ours."""
    if dest.is_symlink():
        raise UsageError(f"DEST {dest} is a symbolic link: give the folder itself")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"DEST {dest} is a file: give a folder (new, empty or an export)")
    parent = next((p for p in dest.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"DEST {dest} cannot be made: {parent} is a file")
    if dest.is_dir() and any(dest.iterdir()) and not is_export(dest):
        raise UsageError(
            f"DEST {dest} holds files that are not a nanochat export: choose a new or empty "
            "folder (nothing there was touched)"
        )


def is_export(folder: Path) -> bool:
    """True for a folder ``export`` wrote: a marked config.json and only export files."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        names = [p.name for p in folder.iterdir()]
    except (OSError, ValueError):
        return False
    known = all(any(fnmatch.fnmatch(n, pattern) for pattern in EXPORT_FILES) for n in names)
    return isinstance(config, dict) and EXPORT_MARK in config and known


def _sync_folder(folder: Path) -> None:
    """Flush every file of ``folder`` to disk and make it readable by all (safetensors
    writes 0600; artifacts are shared with containers and volumes)."""
    for path in folder.iterdir():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(path, 0o644)


def write_weights(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """``model.safetensors``, or shards and their index above ``MAX_SHARD``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(folder: Path, fields: dict, stops: list[int], dtype: str, source: dict) -> None:
    from transformers import GenerationConfig

    from nanochat.export.modeling_nanochat_full import NanochatFullConfig

    config = NanochatFullConfig(**fields)
    config.architectures = [hf_weights.ARCHITECTURE]
    config.auto_map = dict(hf_weights.AUTO_MAP)
    config.dtype = dtype
    setattr(config, EXPORT_MARK, source)
    config.save_pretrained(str(folder))
    generation = GenerationConfig(
        bos_token_id=fields["bos_token_id"],
        eos_token_id=stops,
        # pad is a stop token: transformers then never guesses an attention mask from it
        pad_token_id=fields["pad_token_id"],
        do_sample=False,
    )
    generation.save_pretrained(str(folder))


def parity_prompts(tokenizer, window: int, context: int) -> list[list[int]]:
    """Token ids of the check's prompts: two short texts, a chat prompt, and one text longer
    than the sliding window (up to the context)."""
    prompts = [tokenizer.encode(text, prepend="<|bos|>") for text in PROMPTS]
    turns = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": ""}]
    chat = {"messages": turns}
    prompts.append(tokenizer.render_for_completion(chat))
    long_ids = tokenizer.encode(" ".join(PROMPTS) * 200, prepend="<|bos|>")
    prompts.append(long_ids[: min(context, max(2 * window, 64))])
    return [p[:context] for p in prompts]


@torch.no_grad()
def check_parity(folder: Path, model, tokenizer, dtype: torch.dtype) -> dict:
    """Load ``folder`` with transformers and compare its float32 logits with ``model``'s
    (its weights rounded to ``dtype`` first, as the folder holds them)."""
    from transformers import AutoModelForCausalLM

    from nanochat.model.gpt import short_window

    if dtype != torch.float32:
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    theirs = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=True, local_files_only=True, dtype=torch.float32
    ).eval()
    config = model.config
    prompts = parity_prompts(tokenizer, short_window(config), config.sequence_len)
    worst = 0.0
    for ids in prompts:
        batch = torch.tensor([ids])
        ours = model(batch)
        exported = theirs(batch, use_cache=False).logits
        worst = max(worst, (ours - exported).abs().max().item())
    return {
        "max_abs_diff": worst,
        "prompts": len(prompts),
        "longest": max(len(p) for p in prompts),
        "dtype": str(dtype).removeprefix("torch."),
    }


def export(
    base: Path,
    source: str = "auto",
    tag: str | None = None,
    step: int | None = None,
    dest: Path | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> Exported:
    """Export the checkpoint ``source``/``tag``/``step`` picks to ``dest`` (default
    ``BASE_DIR/export/<kind>-<tag>``); UsageError for anything wrong, before any work."""
    from nanochat.export.model_card import model_card
    from nanochat.inference.engine import open_chat_checkpoint
    from nanochat.tokenizer import tokenizer_dir
    from nanochat.training import checkpoint

    base = Path(base)
    found, tokenizer, meta = open_chat_checkpoint(base, source, tag, step, other_flag="-i")
    kind, tag = meta["source"], meta["tag"]
    dest = Path(dest) if dest is not None else default_dest(base, kind, tag)
    check_dest(dest)
    torch_dtype = hf_weights.DTYPES[dtype]
    model = checkpoint.load_model(found, "cpu", tokenizer.vocab_size)  # float32, eval mode
    config = model.config
    # An unknown weight or setting is refused here, before any writing. In float32 the
    # renamed tensors are the model's own, not a copy.
    exported = hf_weights.hf_state(model.state_dict(), torch_dtype)
    fields = hf_weights.hf_config_fields(config, tokenizer)
    size = sum(t.numel() * t.element_size() for t in exported.values())
    check_free_space(dest, size + (1 << 20))
    log(
        f"exporting {kind}/{tag} step {found.step} ({human_bytes(size)} of {dtype} "
        f"weights) to {dest}"
    )

    with work_folder(dest) as work:
        inside = found.directory.is_relative_to(base)
        where = found.directory.relative_to(base) if inside else None
        source_facts = {
            "kind": kind, "tag": tag, "step": found.step,
            "checkpoint": str(where or found.directory.name),
        }  # fmt: skip
        write_weights(work, exported)
        del exported
        stops = hf_weights.stop_token_ids(tokenizer)
        write_config(work, fields, stops, dtype, source_facts)
        shutil.copyfile(
            Path(__file__).with_name(hf_weights.MODELING_FILE), work / hf_weights.MODELING_FILE
        )
        write_tokenizer(work, tokenizer_dir(base), tokenizer, config.sequence_len)
        log("checking the folder: transformers loads it and its logits are compared with ours")
        parity = check_parity(work, model, tokenizer, torch_dtype)
        if not parity["max_abs_diff"] <= TOLERANCE:
            raise StageFailed(
                f"the exported model's logits differ from ours by {parity['max_abs_diff']:.3g} "
                f"(allowed {TOLERANCE}): the folder was not kept"
            )
        facts = {
            **source_facts, "run_config": meta.get("run_config"), "val_bpb": meta.get("val_bpb")
        }  # fmt: skip
        card = model_card(
            f"nanochat {kind} {tag}", config, facts, base / "report", parity,
        )  # fmt: skip
        (work / "README.md").write_text(card, encoding="utf-8")
        _sync_folder(work)
        _replace(work, dest)
    log(
        f"exported to {dest}: max |logit difference| {parity['max_abs_diff']:.2e} on "
        f"{parity['prompts']} prompts (up to {parity['longest']} tokens)"
    )
    return Exported(dest, parity)


@contextlib.contextmanager
def work_folder(dest: Path) -> Iterator[Path]:
    """A hidden temp folder beside ``dest`` to write the export in, removed unless it took
    ``dest``'s place. Under a lock on the parent (one export at a time writes there), after
    removing what a killed export of ``dest`` left: its work folder, or the old export it
    had moved aside (never a complete export; gigabytes each)."""
    with lock_folder(dest.parent):
        for prefix in (f".{dest.name}.export-", f".{dest.name}.old-"):
            for folder in dest.parent.glob(prefix + "*"):
                log(f"removing {folder}, left by an export that was stopped")
                shutil.rmtree(folder, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone already once it is in place


def _replace(work: Path, dest: Path) -> None:
    """Put ``work`` in place of ``dest``: a rename, with the old export moved aside first,
    put back if the new one cannot take its place, removed once it has."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old)  # an empty folder is replaced by the old export
    try:
        os.replace(work, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    folder = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the renames themselves reach the disk
    finally:
        os.close(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
