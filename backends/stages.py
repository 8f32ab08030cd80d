"""THE stage table: every stage of the pipeline, in order, and everything needed to run it.

Make targets, Invoke tasks, ``make help``, ``--dry-run`` and every backend read this table;
adding a stage is one row here plus one entry module. A stage whose module does not exist
yet stays listed and fails with one clear line when run.

Fields: ``module`` is run as ``python -m <module>`` (or under torchrun); ``hardware`` is
``cpu`` (one process, no GPU), ``gpu`` (one process, one GPU) or ``gpus`` (GPUS processes
under torchrun); ``knobs`` become script flags (``depth`` -> ``--depth=12``); ``reads`` and
``writes`` are artifact paths under BASE_DIR; ``preset_args`` are extra script flags per
preset, only where a preset departs from the script's own default.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from nanochat.common import UsageError


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    summary: str
    hardware: str
    knobs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    preset_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source_is_data: bool = False  # SOURCE means a mirror/folder here, not a checkpoint kind

    @property
    def multiprocess(self) -> bool:
        return self.hardware == "gpus"

    def implemented(self) -> bool:
        """True when the entry module exists (derived, never a flag to keep in sync)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False


CKPT = "{source}_checkpoints/"

STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "nanochat.dataset",
        "fetch pretraining shards in parallel (or build the embedded corpus)",
        "cpu",
        knobs=("dataset", "shards", "source"),
        writes=("base_data/{dataset}/",),
        source_is_data=True,
    ),
    Stage(
        "tokenizer",
        "scripts.tok_train",
        "train the byte-level BPE tokenizer on the training shards",
        # The seed gives this stage one GPU on Modal (more CPU cores come with it);
        # the work itself is CPU-only (rustbpe).
        "gpu",
        knobs=("dataset",),
        reads=("base_data/{dataset}/",),
        writes=("tokenizer/", "report/tokenizer.md"),
        preset_args={"tiny": ("--vocab-size=4096",)},
    ),
    Stage(
        "tokenizer-eval",
        "scripts.tok_eval",
        "compression (bytes/token) on held-out train and validation text",
        "cpu",
        # It evaluates on the dataset the tokenizer was trained on (tokenizer.json says which).
        reads=("tokenizer/", "base_data/"),
        writes=("report/tokenizer-eval.md",),
    ),
    Stage(
        "pretrain",
        "scripts.base_train",
        "pretrain the base model (Muon + AdamW, depth dial, resumable)",
        "gpus",
        knobs=("depth", "device_batch", "run", "dataset"),
        reads=("tokenizer/", "base_data/{dataset}/"),
        writes=("base_checkpoints/", "report/pretrain.md"),
    ),
    Stage(
        "base-eval",
        "scripts.base_eval",
        "evaluate the base model: CORE, bits per byte, samples",
        "gpus",
        knobs=("device_batch", "dataset"),
        reads=("base_checkpoints/", "eval_bundle/"),
        writes=("report/base-eval.md",),
    ),
    Stage(
        "midtrain",
        "scripts.mid_train",
        "teach conversation tokens, tool use and multiple choice",
        "gpus",
        knobs=("device_batch", "run"),
        reads=("base_checkpoints/", "task_data/"),
        writes=("mid_checkpoints/",),
    ),
    Stage(
        "sft",
        "scripts.chat_sft",
        "supervised fine-tuning on the chat mixture (loss on assistant tokens)",
        "gpus",
        knobs=("source", "device_batch", "run"),
        reads=(CKPT, "task_data/"),
        writes=("sft_checkpoints/",),
    ),
    Stage(
        "rl",
        "scripts.chat_rl",
        "optional: reinforcement learning on GSM8K",
        "gpus",
        knobs=("source", "device_batch", "run"),
        reads=(CKPT, "task_data/"),
        writes=("rl_checkpoints/",),
    ),
    Stage(
        "chat-eval",
        "scripts.chat_eval",
        "chat benchmarks: ARC, MMLU, GSM8K, HumanEval, ChatCORE",
        "gpus",
        knobs=("source",),
        reads=(CKPT, "task_data/"),
        writes=("report/chat-eval-{source}.md",),
    ),
    Stage(
        "chat-cli",
        "scripts.chat_cli",
        "chat with a checkpoint in the terminal",
        "gpu",
        knobs=("source",),
        reads=(CKPT,),
    ),
    Stage(
        "chat-web",
        "scripts.chat_web",
        "serve the chat page and an OpenAI-compatible API",
        "gpu",
        knobs=("source",),
        reads=(CKPT,),
    ),
    Stage(
        "report",
        "scripts.report",
        "stitch every stage's section into report/report.md",
        "cpu",
        reads=("report/",),
        writes=("report/report.md",),
    ),
)
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}


def get_stage(name: str) -> Stage:
    try:
        return STAGES_BY_NAME[name]
    except KeyError:
        raise UsageError(
            f"unknown stage {name!r}; stages: {', '.join(STAGES_BY_NAME)} (see make help)"
        ) from None
