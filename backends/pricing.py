"""Cost of a remote run, printed before it starts, and GPU-hours after each stage.

The prices come from ``nanochat/prices.py`` (Modal's on-demand list prices, the one copy,
which the report stage reads too). The other tables, kept here and nowhere else: a rough
relative training speed per GPU type, the training throughput we measured
(docs/benchmarks.md), and rough wall hours for the other stages.

Pretraining is derived, not guessed: the tokens the preset's command will train (the depth
dial, ``scripts.base_train.planned``: depth, ratio, batch) divided by the tokens/s its GPUs
give, which come from the measured throughput at the nearest measured depth scaled by
FLOPs per token (the same MFU), times 1.17 with fp8, the GPU type's relative
speed and the GPU count (linear: optimistic past one node), plus TRAINING_OVERHEAD for the
evaluations and checkpoints during training. Other stages and CPU runs use EXPECTED_HOURS,
scaled by throughput for multi-GPU stages on other GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.stages import Stage, gpu_count, remote_resources
from nanochat.common import UsageError
from nanochat.model import dial
from nanochat.prices import CPU_CORE_PRICE, GPU_PRICE, MEMORY_PRICE

# bf16 training speed relative to one H100 (rough, for estimates only).
RELATIVE_SPEED = {
    "B200": 2.0,
    "H200": 1.1,
    "H100": 1.0,
    "A100-80GB": 0.45,
    "A100-40GB": 0.42,
    "A100": 0.42,
    "L40S": 0.35,
    "A10G": 0.12,
    "A10": 0.12,
    "L4": 0.11,
    "T4": 0.05,
}

# Measured: tokens/s of one H100 80GB (bf16, torch.compile, context 2048, vocab 32,768),
# scripts.bench_train, docs/benchmarks.md (2026-11-24).
MEASURED_H100_TOKENS_PER_S = {12: 483_914, 20: 143_048}
MEASURED_VOCAB, MEASURED_SEQ = 32768, 2048
# One CPU thread: 3,044 tokens/s on 2 threads of an AMD EPYC at d4, vocab 4,096, context
# 256 (fp32, docs/benchmarks.md, 2026-11-24): (depth, vocab, context, tokens/s per thread).
MEASURED_CPU_THREAD = (4, 4096, 256, 3044 / 2)
FP8_SPEEDUP = 1.17  # tensorwise fp8 at d26 on H100
TRAINING_OVERHEAD = 1.1  # val bpb / CORE / samples during training, checkpoints, start-up

# Rough wall hours per stage on the preset's reference GPUs (its GPU knob; the seed's
# A100-80GB:4 when it names none), for what is not derived: every stage but pretraining on
# GPUs. tiny: measured on 2 CPU cores (docs/benchmarks.md).
REFERENCE_GPU = {"tiny": "cpu", "quick": "A100-80GB:4", "speedrun": "H100:8", "gpt2": "H100:8"}
EXPECTED_HOURS: dict[str, dict[str, float]] = {
    "tiny": {
        "download": 0.02,
        "task-data": 0.01,
        "tokenizer": 0.02,
        "tokenizer-eval": 0.01,
        "pretrain": 0.1,
        "base-eval": 0.05,
        "midtrain": 0.05,
        "sft": 0.05,
        "rl": 0.05,
        "chat-eval": 0.05,
        "report": 0.01,
    },
    "quick": {
        "download": 0.1,
        "task-data": 0.1,
        "tokenizer": 0.5,
        "tokenizer-eval": 0.05,
        "base-eval": 0.25,
        "midtrain": 0.25,
        "sft": 0.25,
        "rl": 0.5,
        "chat-eval": 0.25,
        "report": 0.01,
    },
    "speedrun": {
        "download": 0.5,
        "task-data": 0.1,
        "tokenizer": 0.3,
        "tokenizer-eval": 0.05,
        "base-eval": 0.25,
        "midtrain": 0.2,
        "sft": 0.15,
        "rl": 0.5,
        "chat-eval": 0.25,
        "report": 0.01,
    },
    "gpt2": {
        "download": 0.5,
        "task-data": 0.1,
        "tokenizer": 0.3,
        "tokenizer-eval": 0.05,
        "base-eval": 0.3,
        "midtrain": 0.25,
        "sft": 0.2,
        "rl": 0.6,
        "chat-eval": 0.3,
        "report": 0.01,
    },
}


@dataclass(frozen=True)
class Estimate:
    stage: str
    gpu: str | None  # Modal GPU string; None = CPU
    hours: float
    cost: float
    cores: int
    derived: str = ""  # how the hours were derived, when they were
    nodes: int = 1  # containers of ``gpu`` (a Modal cluster); cost counts them all

    def line(self) -> str:
        where = f"{self.gpu}" if self.gpu else f"CPU x{self.cores}"
        if self.nodes > 1:
            where = f"{self.nodes} nodes x {where}"
        how = f" ({self.derived})" if self.derived else ""
        return f"{self.stage}: {where}, ~{self.hours:.2f} h, ~${self.cost:.2f}{how}"


def _throughput(spec: str | None) -> float:
    if not spec or spec == "cpu":
        return 0.0
    kind = spec.partition(":")[0]
    return RELATIVE_SPEED.get(kind, 0.5) * gpu_count(spec)


def hourly_cost(gpu: str | None, stage: Stage) -> float:
    """USD per wall hour of ``stage``'s container on ``gpu`` (None = a CPU container): the
    GPUs, and the cores and memory it requests (Modal bills them on top)."""
    cores, memory_gb = remote_resources(stage, gpu)
    gpus = 0.0
    if gpu is not None:
        kind = gpu.partition(":")[0]
        gpus = GPU_PRICE.get(kind, max(GPU_PRICE.values())) * gpu_count(gpu)
    return gpus + cores * CPU_CORE_PRICE + memory_gb * MEMORY_PRICE


def h100_tokens_per_s(depth: int, vocab: int, seq_len: int) -> float:
    """One H100's training tokens/s at this size: the measured MFU of the nearest measured
    depth, applied to this size's FLOPs per token."""
    nearest = min(MEASURED_H100_TOKENS_PER_S, key=lambda d: abs(d - depth))
    measured_flops = MEASURED_H100_TOKENS_PER_S[nearest] * dial.flops_per_token(
        nearest, MEASURED_VOCAB, MEASURED_SEQ
    )
    return measured_flops / dial.flops_per_token(depth, vocab, seq_len)


def _count(n: float) -> str:
    """5.22B, 1.3M, 143K, 950: a count as a person reads it."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:,.2f}{unit}" if unit != "K" else f"{n / size:,.0f}{unit}"
    return f"{n:,.0f}"


def cpu_tokens_per_s(depth: int, vocab: int, seq_len: int, cores: int) -> float:
    """A CPU container's training tokens/s: the measured per-thread figure, scaled by FLOPs
    per token and the cores (each process's threads share them out)."""
    m_depth, m_vocab, m_seq, per_thread = MEASURED_CPU_THREAD
    flops = dial.flops_per_token(m_depth, m_vocab, m_seq) / dial.flops_per_token(
        depth, vocab, seq_len
    )
    return per_thread * cores * flops


def pretrain_hours(
    argv: list[str], gpu: str | None, cores: int, nodes: int = 1
) -> tuple[float, str]:
    """Hours of the pretraining command ``argv`` (its script flags) on ``nodes`` x ``gpu``
    (None: a CPU container of ``cores``), and how they were derived. Nodes are assumed to
    add throughput linearly (unmeasured: docs/multinode.md)."""
    from scripts.base_train import planned

    count = gpu_count(gpu) or 1
    the_dial = planned(argv, count * nodes, dial.DEFAULT_VOCAB)
    fp8 = "--fp8" in argv
    if gpu is None:
        speed = cpu_tokens_per_s(the_dial.depth, the_dial.vocab_size, the_dial.seq_len, cores)
    else:
        speed = h100_tokens_per_s(the_dial.depth, the_dial.vocab_size, the_dial.seq_len)
        speed *= (FP8_SPEEDUP if fp8 else 1.0) * _throughput(gpu) * nodes
    hours = the_dial.tokens / speed / 3600 * TRAINING_OVERHEAD
    how = (
        f"{_count(the_dial.tokens)} tokens at ~{_count(speed)} tokens/s"
        f"{', fp8' if fp8 else ''}, from docs/benchmarks.md"
    )
    return hours, how


def estimate(
    stage: Stage,
    preset: str,
    gpu: str | None,
    reference_gpu: str | None,
    argv: list[str] | None = None,
    nodes: int = 1,
) -> Estimate:
    """Hours and cost of one stage on ``gpu`` (``nodes`` containers of it for a multi-GPU
    stage: the wall hours shrink, the cost counts every node): measured hours where the
    table has them (tiny), derived for pretraining elsewhere (``argv``: its script flags;
    GPUs or CPU), else scaled from the preset's reference GPUs."""
    cores = remote_resources(stage, gpu)[0]
    nodes = nodes if stage.hardware == "gpus" else 1
    table = EXPECTED_HOURS.get(preset, EXPECTED_HOURS["speedrun"])
    measured = preset in EXPECTED_HOURS and stage.name in table and gpu is None
    if stage.name == "pretrain" and argv is not None and not measured:
        try:
            hours, how = pretrain_hours(argv, gpu, cores, nodes)
            cost = hours * hourly_cost(gpu, stage) * nodes
            return Estimate(stage.name, gpu, hours, cost, cores, how, nodes)
        except UsageError:  # a batch that does not divide: the dry run says so itself
            pass
    hours = table.get(stage.name, 0.25)
    reference = _throughput(reference_gpu)
    actual = _throughput(gpu)
    if stage.hardware == "gpus" and reference and actual:
        hours *= reference / (actual * nodes)
    cost = hours * hourly_cost(gpu, stage) * nodes
    return Estimate(stage.name, gpu, hours, cost, cores, nodes=nodes)


def gpu_hours(gpu: str | None, seconds: float) -> float:
    """GPU-hours used by a stage that held ``gpu`` for ``seconds``."""
    return gpu_count(gpu) * seconds / 3600
