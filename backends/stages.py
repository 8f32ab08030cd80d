"""THE stage table: every stage of the pipeline, in order, and everything needed to run it.

Make targets, Invoke tasks, ``make help``, ``--dry-run`` and every backend read this table;
adding a stage is one row here plus one entry module. A stage whose module does not exist
yet stays listed and fails with one clear line when run.

Fields: ``module`` is run as ``python -m <module>`` (or under torchrun); ``hardware`` is
``cpu`` (one process, no GPU), ``gpu`` (one process, one GPU) or ``gpus`` (GPUS processes
under torchrun); ``knobs`` become script flags (``depth`` -> ``--depth=12``); ``reads`` and
``writes`` are artifact paths under BASE_DIR; ``preset_args`` are extra script flags per
preset, only where a preset departs from the script's own default. ``done`` is the artifact
whose presence means the stage completed (``make speedrun`` skips it; None = always run, for
stages that are idempotent and cheap to re-check). ``timeout_h`` and ``retries`` bound one
remote attempt (Modal): training stages resume from their last checkpoint when retried.
``cores`` and ``memory_gb`` size a remote CPU container (Modal); GPU containers get
``CORES_PER_GPU`` and ``MEMORY_GB_PER_GPU`` per GPU. ``interactive`` stages read the
keyboard unless given a prompt flag (``prompt_flags``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from backends.presets import PRETRAIN_RECIPES
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
    done: str | None = None
    # "module:function(argv, processes, base_dir) -> lines" a dry run prints (light imports)
    explain: str | None = None
    # A server stage's port: containers run it with --host=0.0.0.0 --port=<this> and publish it.
    web_port: int | None = None
    timeout_h: float = 2.0
    retries: int = 1
    cores: int = 4  # a remote CPU container's cores (Modal): REMOTE_CPU_CORES
    memory_gb: int = 8  # a remote CPU container's memory (Modal): REMOTE_CPU_MEMORY_GB
    # A stage that reads the keyboard (a REPL) unless one of these flags gives it the input.
    interactive: bool = False
    prompt_flags: tuple[str, ...] = ()
    # Knobs the stage cannot run without, and secrets it needs (checked before any launch).
    needs: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()

    @property
    def multiprocess(self) -> bool:
        return self.hardware == "gpus"

    def reads_keyboard(self, argv: list[str]) -> bool:
        """True for an interactive stage whose command gives it no prompt flag."""
        flags = {arg.split("=", 1)[0] for arg in argv}
        return self.interactive and not flags & set(self.prompt_flags)

    def done_path(self, knobs: dict[str, object]) -> str | None:
        """The completion marker for these knobs, relative to BASE_DIR (None: always run,
        also when the marker names a knob that is not set, like chat-eval's SOURCE)."""
        if self.done is None or ("{source}" in self.done and not knobs.get("source")):
            return None
        return self.done.format(**{k: knobs.get(k) for k in ("dataset", "source")})

    def implemented(self) -> bool:
        """True when the entry module exists (derived, never a flag to keep in sync)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False


CKPT = "{source}_checkpoints/"
# tiny: midtraining and SFT on the embedded task miniatures at pretraining's context, ~1 min each.
TINY_CHAT_TRAINING = (
    "--tasks=embedded",
    "--seq-len=256",
    "--num-steps=60",
    "--eval-every=30",
    "--eval-batches=2",
    "--save-every=30",
)

# smoke (extends tiny): the same stages at a few steps each, to check the wiring quickly.
SMOKE_CHAT_TRAINING = ("--num-steps=4", "--eval-every=2", "--eval-batches=1", "--save-every=2")

STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "scripts.download",
        "fetch pretraining shards in parallel (or build the embedded corpus)",
        "cpu",
        knobs=("dataset", "shards", "source"),
        writes=("base_data/{dataset}/",),
        source_is_data=True,
        # Always re-run: it verifies every shard and fetches only missing or damaged ones.
        timeout_h=3,
        retries=2,
    ),
    Stage(
        "task-data",
        "scripts.task_data",
        "fetch the chat datasets (GSM8K, ARC, MMLU, HumanEval, SmolTalk) from the hub",
        "cpu",
        writes=("task_data/",),
        # tiny: the chat stages use the embedded miniatures, so there is nothing to fetch.
        preset_args={"tiny": ("--tasks=embedded",)},
        # Always re-run: it verifies every file and fetches only missing or damaged ones.
        timeout_h=1,
        retries=2,
    ),
    Stage(
        "tokenizer",
        "scripts.tok_train",
        "train the byte-level BPE tokenizer on the training shards",
        # CPU work (rustbpe, all cores): on Modal a CPU container sized for the default
        # 2e9 characters (the text and its chunk counts in memory), not a rented GPU.
        "cpu",
        knobs=("dataset",),
        reads=("base_data/{dataset}/",),
        writes=("tokenizer/", "report/tokenizer.md"),
        preset_args={"tiny": ("--vocab-size=4096",)},
        done="tokenizer/tokenizer.json",
        cores=16,
        memory_gb=64,
    ),
    Stage(
        "tokenizer-eval",
        "scripts.tok_eval",
        "compression (bytes/token) on held-out train and validation text",
        "cpu",
        # It evaluates on the dataset the tokenizer was trained on (tokenizer.json says which).
        reads=("tokenizer/", "base_data/"),
        writes=("report/tokenizer-eval.md",),
        done="report/tokenizer-eval.md",
    ),
    Stage(
        "pretrain",
        "scripts.base_train",
        "pretrain the base model (Muon + AdamW, depth dial, resumable)",
        "gpus",
        knobs=("depth", "device_batch", "run", "dataset"),
        reads=("tokenizer/", "base_data/{dataset}/"),
        writes=("base_checkpoints/", "report/pretrain.md"),
        # tiny: 80 steps of 8192 tokens at context 256, ~3 minutes on 2 CPU cores.
        preset_args={
            "tiny": (
                "--seq-len=256",
                "--total-batch=8192",
                # The recipe scales LRs by sqrt(batch / 2^19): at 8192 tokens that is 1/8,
                # far below where it was fitted; x4 measured best for one pass over the
                # data, and memorizes it over three: E passes take 4 / E**2
                # (docs/benchmarks.md, "The 2026 recipe").
                "--lr-scale=4",
                "--lr-scale-per-pass",
                "--num-steps=80",
                "--eval-every=40",
                # 10 x 16 rows x 256 = 41K tokens: the whole embedded val split (36K), once
                "--eval-batches=10",
                "--save-every=40",
            ),
            "smoke": (
                "--total-batch=4096",
                "--num-steps=6",
                "--eval-every=3",
                "--eval-batches=1",
                "--save-every=3",
            ),
            # The GPU presets' ratio, fp8 and windows, from their one table (which also
            # sizes their shards; the price follows from these flags).
            **{name: recipe.flags() for name, recipe in PRETRAIN_RECIPES.items()},
        },
        done="report/pretrain.md",
        explain="scripts.base_train:explain",
        timeout_h=24,  # Modal's limit per attempt; a retry resumes from the last checkpoint
        retries=3,
    ),
    Stage(
        "base-eval",
        "scripts.base_eval",
        "evaluate the base model: CORE, bits per byte, samples",
        "gpus",
        knobs=("device_batch", "dataset"),
        reads=("base_checkpoints/", "tokenizer/", "base_data/{dataset}/"),
        writes=("eval_bundle/", "report/base-eval.md", "report/base-eval-core.csv"),
        # tiny: the embedded miniature CORE bundle (offline); never a silent fallback.
        preset_args={
            "tiny": ("--bundle=embedded",),
            "smoke": ("--max-per-task=16", "--bpb-steps=2"),
        },
        done="report/base-eval.md",
        timeout_h=4,
    ),
    Stage(
        "midtrain",
        "scripts.mid_train",
        "teach conversation tokens, tool use and multiple choice",
        "gpus",
        knobs=("device_batch", "run"),
        reads=("base_checkpoints/", "task_data/"),
        writes=("mid_checkpoints/", "report/midtrain.md"),
        preset_args={"tiny": (*TINY_CHAT_TRAINING, "--lr-scale=4"), "smoke": SMOKE_CHAT_TRAINING},
        done="report/midtrain.md",
        timeout_h=8,
        retries=3,
    ),
    Stage(
        "sft",
        "scripts.chat_sft",
        "supervised fine-tuning on the chat mixture (loss on assistant tokens)",
        "gpus",
        knobs=("source", "device_batch", "run"),
        reads=(CKPT, "task_data/"),
        writes=("sft_checkpoints/", "report/sft.md"),
        preset_args={
            "tiny": (
                *TINY_CHAT_TRAINING,
                "--init-lr-frac=0.2",
                "--chatcore-every=30",
                "--chatcore-problems=8",
                "--chatcore-max-tokens=64",
            ),
            "smoke": (*SMOKE_CHAT_TRAINING, "--chatcore-problems=2", "--chatcore-max-tokens=16"),
        },
        done="report/sft.md",
        timeout_h=8,
        retries=3,
    ),
    Stage(
        "rl",
        "scripts.chat_rl",
        "optional: reinforcement learning on GSM8K",
        "gpus",
        knobs=("source", "device_batch", "run"),
        reads=(CKPT, "task_data/"),
        writes=("rl_checkpoints/", "report/rl.md"),
        # tiny: a few steps of 4 prompts x 4 samples on the embedded GSM8K miniature.
        preset_args={
            "tiny": (
                "--tasks=embedded",
                "--num-steps=12",
                "--prompts-per-step=4",
                "--samples=4",
                "--max-new-tokens=64",
                "--eval-every=6",
                "--eval-problems=16",
                "--save-every=6",
            ),
            "smoke": ("--num-steps=2", "--eval-every=0", "--eval-problems=2", "--save-every=1"),
        },
        done="report/rl.md",
        timeout_h=8,
        retries=3,
    ),
    Stage(
        "chat-eval",
        "scripts.chat_eval",
        "chat benchmarks: ARC, MMLU, GSM8K, HumanEval, ChatCORE",
        "gpus",
        knobs=("source",),
        reads=(CKPT, "task_data/"),
        writes=("report/chat-eval-{source}.md",),
        preset_args={
            "tiny": ("--tasks=embedded", "--max-problems=20", "--max-new-tokens=64", "--batch=8"),
            "smoke": ("--max-problems=4", "--max-new-tokens=32"),
        },
        done="report/chat-eval-{source}.md",
        timeout_h=4,
    ),
    Stage(
        "chat-cli",
        "scripts.chat_cli",
        "chat with a checkpoint in the terminal",
        "gpu",
        knobs=("source",),
        reads=(CKPT,),
        retries=0,
        interactive=True,
        prompt_flags=("-p", "--prompt"),
    ),
    Stage(
        "chat-web",
        "scripts.chat_web",
        "serve the chat page and an OpenAI-compatible API",
        "gpu",
        knobs=("source",),
        reads=(CKPT,),
        web_port=8000,
        timeout_h=24,
        retries=0,
    ),
    Stage(
        "report",
        "scripts.report",
        "stitch every stage's section into report/report.md",
        "cpu",
        reads=("report/",),
        writes=("report/report.md",),
        timeout_h=0.5,
    ),
    Stage(
        "export",
        "scripts.export",
        "a checkpoint as a Hugging Face transformers folder (weights, tokenizer, chat template)",
        "cpu",
        knobs=("source", "dest"),
        reads=(CKPT, "tokenizer/", "report/"),
        writes=("export/",),
        timeout_h=1,
        # Our model, the renamed weights and transformers' copy (the check) at once, fp32.
        memory_gb=32,
    ),
    Stage(
        "push-hub",
        "scripts.push_hub",
        "upload an exported folder to the Hugging Face Hub (private unless --public)",
        "cpu",
        knobs=("repo", "dest", "source"),
        reads=("export/",),
        needs=("repo",),
        secrets=("HF_TOKEN",),
        timeout_h=2,
    ),
)
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}

# `make speedrun`: raw text to a chat model with a report card. Each entry is a stage plus
# the knobs it runs with whatever the user set (chat-eval once per checkpoint kind, so the
# report card fills its MID / SFT / RL columns; sft and rl name what they start from, so a
# user's SOURCE reaches only the download, as its data mirror), and the bool knob that
# must be on for it to run (RL=1 adds RL and its chat eval).


@dataclass(frozen=True)
class SpeedrunEntry:
    stage: str
    knobs: dict[str, str] = field(default_factory=dict)  # win over the user's knobs
    when: str | None = None  # a bool knob that must be set; None = always

    @property
    def label(self) -> str:
        """``chat-eval SOURCE=mid``: how dry runs and logs name the entry."""
        return " ".join([self.stage, *(f"{k.upper()}={v}" for k, v in self.knobs.items())])


SPEEDRUN: tuple[SpeedrunEntry, ...] = (
    SpeedrunEntry("download"),
    SpeedrunEntry("task-data"),
    SpeedrunEntry("tokenizer"),
    SpeedrunEntry("tokenizer-eval"),
    SpeedrunEntry("pretrain"),
    SpeedrunEntry("base-eval"),
    SpeedrunEntry("midtrain"),
    SpeedrunEntry("chat-eval", {"source": "mid"}),
    SpeedrunEntry("sft", {"source": "mid"}),
    SpeedrunEntry("chat-eval", {"source": "sft"}),
    SpeedrunEntry("rl", {"source": "sft"}, when="rl"),
    SpeedrunEntry("chat-eval", {"source": "rl"}, when="rl"),
    SpeedrunEntry("report"),
)
# Knobs that mean something to `make speedrun` only (a single stage notes them as unused).
SPEEDRUN_KNOBS = ("rl", "force")
# The tokenizer reads 2e9 characters by default (scripts/tok_train.py --max-chars) and a
# ClimbMix/FineWeb shard holds ~250M: the first 8 shards are enough for it, so
# a speedrun that needs more downloads those first and the rest in the background while
# the entries below run (the seed's speedrun does the same).
TOKENIZER_SHARDS = 8
WHILE_DOWNLOADING = ("task-data", "tokenizer", "tokenizer-eval")
# Training scripts read RESUME_ENV (nanochat.common) as their --resume default: FORCE sets
# "never" (start over; on Modal "since:<start>", so a retry continues the forced run),
# Modal's retries "auto" (continue from the latest checkpoint).


def trains(stage: Stage) -> bool:
    """True for stages that write checkpoints (and resume from them)."""
    return any(path.endswith("_checkpoints/") for path in stage.writes)


# Remote GPUs when neither GPU nor the preset names one: the seed's choice (A100-80GB,
# four for the multi-GPU stages, one for the single-GPU ones).
DEFAULT_GPU_TYPE = "A100-80GB"
DEFAULT_GPU_COUNT = 4
# A remote CPU container's default size (the Stage defaults above say the same numbers).
REMOTE_CPU_CORES = Stage.cores  # cores (and the processes it can hold)
REMOTE_CPU_MEMORY_GB = Stage.memory_gb
CORES_PER_GPU = 8  # a remote GPU container's cores and memory, per GPU (Modal)
MEMORY_GB_PER_GPU = 32


def remote_resources(stage: Stage, gpu: str | None) -> tuple[int, int]:
    """(cores, memory in GiB) a remote container requests for ``stage`` on ``gpu`` (a Modal
    GPU string; None = a CPU container). Any stage may run in a CPU container (GPU=cpu):
    a GPU stage's CPU container gets the default size."""
    if gpu is None:
        if stage.hardware == "cpu":
            return stage.cores, stage.memory_gb
        return REMOTE_CPU_CORES, REMOTE_CPU_MEMORY_GB
    count = gpu_count(gpu)
    return CORES_PER_GPU * count, MEMORY_GB_PER_GPU * count


def remote_threads(stage: Stage, gpu: str | None, nproc: int) -> int:
    """OMP_NUM_THREADS of a remote stage: 1 per process beside GPUs (they do the work),
    else the container's requested cores shared out (not os.cpu_count(): a container sees
    the host's cores, not its share)."""
    if gpu is not None:
        return 1
    return max(1, remote_resources(stage, gpu)[0] // max(nproc, 1))


def remote_gpu(stage: Stage, gpu: object | None) -> str | None:
    """The Modal GPU string for a stage: None (CPU) for cpu stages and for GPU=cpu; the
    type alone for single-GPU stages; TYPE:COUNT for multi-GPU stages."""
    if stage.hardware == "cpu" or str(gpu).lower() == "cpu":
        return None
    if gpu:
        kind, _, count = str(gpu).partition(":")
        count = count or "1"
    else:
        kind, count = DEFAULT_GPU_TYPE, str(DEFAULT_GPU_COUNT)
    return kind if stage.hardware == "gpu" or count == "1" else f"{kind}:{count}"


# Modal cluster sizes with a clustered function per multi-GPU stage (NODES on Modal); each
# node is a whole host (GPU=<type>:8), as Modal's clusters require.
CLUSTER_SIZES = (2, 4)
GPUS_PER_CLUSTER_NODE = 8


def gpu_count(spec: str | None) -> int:
    """GPUs in a Modal GPU string: None -> 0, 'H100' -> 1, 'H100:8' -> 8."""
    if spec is None:
        return 0
    _, _, count = spec.partition(":")
    return int(count or 1)


def get_stage(name: str) -> Stage:
    try:
        return STAGES_BY_NAME[name]
    except KeyError:
        raise UsageError(
            f"unknown stage {name!r}; stages: {', '.join(STAGES_BY_NAME)} (see make help)"
        ) from None
