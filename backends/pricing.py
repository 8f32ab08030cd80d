"""Rough cost of a remote run, printed before it starts, and GPU-hours after each stage.

Two tables, kept here and nowhere else: Modal's on-demand list prices (USD per GPU-hour, and
per CPU core-hour; modal.com/pricing, checked 2026-11, change them here when they move) with
a rough relative training speed per GPU type, and the expected wall hours of each stage per
preset on that preset's reference GPUs. Another GPU type or count scales the GPU stages'
hours by throughput (assumed linear in GPU count: optimistic past one node).
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.stages import REMOTE_CPU_CORES, Stage, gpu_count

# USD per GPU-hour, and bf16 training speed relative to one H100 (rough, for estimates only).
GPU_PRICE = {
    "B200": 6.25,
    "H200": 4.54,
    "H100": 3.95,
    "A100-80GB": 2.50,
    "A100-40GB": 2.10,
    "A100": 2.10,
    "L40S": 1.95,
    "A10G": 1.10,
    "A10": 1.10,
    "L4": 0.80,
    "T4": 0.59,
}
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
CPU_CORE_PRICE = 0.047  # USD per physical core-hour

# Expected wall hours per stage on the preset's reference GPUs (its GPU knob; the seed's
# A100-80GB:4 when it names none). speedrun: the published d20 run (~4 h on 8xH100, DESIGN
# B.9); gpt2: d24 at ratio 8 (1.65 h pretraining with fp8); quick: the seed's d12 quick test.
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
        "pretrain": 0.5,
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
        "pretrain": 3.0,
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
        "pretrain": 1.9,
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

    def line(self) -> str:
        where = f"{self.gpu}" if self.gpu else f"CPU x{REMOTE_CPU_CORES}"
        return f"{self.stage}: {where}, ~{self.hours:.2f} h, ~${self.cost:.2f}"


def _throughput(spec: str | None) -> float:
    if not spec or spec == "cpu":
        return 0.0
    kind = spec.partition(":")[0]
    return RELATIVE_SPEED.get(kind, 0.5) * gpu_count(spec)


def hourly_cost(gpu: str | None) -> float:
    """USD per wall hour for a Modal GPU string (None = a CPU container)."""
    if gpu is None:
        return REMOTE_CPU_CORES * CPU_CORE_PRICE
    kind = gpu.partition(":")[0]
    return GPU_PRICE.get(kind, max(GPU_PRICE.values())) * gpu_count(gpu)


def estimate(stage: Stage, preset: str, gpu: str | None, reference_gpu: str | None) -> Estimate:
    """Hours and cost of one stage on ``gpu``, scaled from the preset's reference GPUs."""
    hours = EXPECTED_HOURS.get(preset, EXPECTED_HOURS["speedrun"]).get(stage.name, 0.25)
    reference = _throughput(reference_gpu)
    actual = _throughput(gpu)
    if stage.hardware == "gpus" and reference and actual:
        hours *= reference / actual
    return Estimate(stage.name, gpu, hours, hours * hourly_cost(gpu))


def gpu_hours(gpu: str | None, seconds: float) -> float:
    """GPU-hours used by a stage that held ``gpu`` for ``seconds``."""
    return gpu_count(gpu) * seconds / 3600
