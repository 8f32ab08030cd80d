"""The depth dial as plain arithmetic: from depth (and vocabulary, context, batch knobs) to
width, parameter counts, total batch, gradient accumulation and horizon.

No torch here: ``make pretrain ... DRY_RUN=1`` prints these figures on a laptop that only
launches, and ``scripts.base_train`` uses the same numbers to train (its tests check the
counts against the real model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanochat.common import UsageError

ASPECT_RATIO = 64  # width per layer of depth
HEAD_DIM = 128
MLP_RATIO = 4
D12_DEPTH = 12
D12_BATCH = 2**19  # tokens per step at d12
BATCH_EXPONENT = 0.383  # total batch ~ data tokens ** 0.383 beyond d12
DEFAULT_RATIO = 12.0  # data tokens per scaling parameter
DEFAULT_VOCAB = 32768  # the tokenizer stage's default vocabulary (2^15)
SEQ_LEN = 2048  # the recipe's context length: pretraining's default; later stages inherit it


def width(depth: int) -> int:
    """64 * depth rounded up to a multiple of the head dimension."""
    return -(-ASPECT_RATIO * depth // HEAD_DIM) * HEAD_DIM


def scaling_params(depth: int, vocab_size: int, kv_heads: int | None = None) -> int:
    """Block matrices + head (the count that sets the data budget) of the plain model."""
    c = width(depth)
    heads = c // HEAD_DIM
    kv = (kv_heads or heads) * HEAD_DIM
    per_layer = c * c + 2 * c * kv + c * c + 2 * MLP_RATIO * c * c  # q, k+v, out, MLP in+out
    return depth * per_layer + vocab_size * c


def flops_per_token(depth: int, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs per token of the plain model (full attention): 6 x the matmul
    parameters + 12 x width x context per layer (``gpt.flops_per_token`` counts
    the same on a built config, and the tests check that the two agree)."""
    return 6 * scaling_params(depth, vocab_size) + 12 * width(depth) * seq_len * depth


def total_params(depth: int, vocab_size: int, kv_heads: int | None = None) -> int:
    return scaling_params(depth, vocab_size, kv_heads) + vocab_size * width(depth)


# Bytes per parameter a training step holds at the least: fp32 weights and gradients and
# one fp32 optimizer buffer (Muon's momentum; AdamW keeps two on the embeddings).
TRAIN_BYTES_PER_PARAM = 12


def least_training_bytes(depth: int, vocab_size: int, device_batch: int, seq_len: int) -> int:
    """A lower bound on one process's memory for a training step: weights, gradients and
    optimizer state, plus the fp32 logits of one micro-batch. Activations come on top, so a
    model that fails this cannot train here at all (the check in base_train)."""
    logits = device_batch * seq_len * vocab_size * 4
    return TRAIN_BYTES_PER_PARAM * total_params(depth, vocab_size) + logits


def derived_total_batch(depth: int, vocab_size: int, ratio: float = DEFAULT_RATIO) -> int:
    """2^19 tokens at d12; B ~ D^0.383 beyond (D = data tokens), a power of two."""
    data = ratio * scaling_params(depth, vocab_size)
    d12_data = ratio * scaling_params(D12_DEPTH, vocab_size)
    return 2 ** round(math.log2(D12_BATCH * (data / d12_data) ** BATCH_EXPONENT))


def scaled_weight_decay(reference: float, depth: int, vocab_size: int, total_batch: int) -> float:
    """The weight decay for this depth and batch from its value at d12 and 2^19 tokens.

    As upstream, after the T_epoch rule (arXiv:2405.13698: B / (lr * decay * D) held fixed,
    with lr ~ sqrt(B)): decay = reference * sqrt(B / 2^19) * D12 / D, where D is the data the
    depth's ratio gives (so D12 / D = scaling params at d12 / at this depth).
    """
    batch = math.sqrt(total_batch / D12_BATCH)
    return (
        reference
        * batch
        * scaling_params(D12_DEPTH, vocab_size)
        / scaling_params(depth, vocab_size)
    )


def _amount(tokens: float) -> str:
    return f"{tokens / 1e9:,.2f}B" if tokens >= 1e9 else f"{tokens / 1e6:,.1f}M"


@dataclass(frozen=True)
class Dial:
    depth: int
    vocab_size: int
    seq_len: int
    device_batch: int
    processes: int
    ratio: float
    scaling: int
    total_batch: int
    accumulation: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.total_batch * self.steps

    def describe(self) -> list[str]:
        c = width(self.depth)
        return [
            f"d{self.depth}: {c} wide, {c // HEAD_DIM} heads of {HEAD_DIM}, "
            f"{total_params(self.depth, self.vocab_size) / 1e6:,.1f}M parameters "
            f"({self.scaling / 1e6:,.1f}M scaling, vocab {self.vocab_size:,})",
            f"horizon: {self.steps:,} steps x {self.total_batch:,} tokens = "
            f"{_amount(self.tokens)} tokens (ratio {self.ratio:g} would be "
            f"{_amount(self.ratio * self.scaling)})",
            f"batch: {self.total_batch:,} tokens = {self.device_batch} rows x {self.seq_len} "
            f"x {self.processes} process(es) x accumulation {self.accumulation}",
        ]


def plan(
    depth: int,
    vocab_size: int,
    seq_len: int,
    device_batch: int,
    processes: int,
    ratio: float = DEFAULT_RATIO,
    total_batch: int | None = None,
    steps: int | None = None,
) -> Dial:
    """Everything the dial derives; a batch that does not divide is one clear error."""
    scaling = scaling_params(depth, vocab_size)
    total = total_batch or derived_total_batch(depth, vocab_size, ratio)
    per_micro = device_batch * seq_len * processes
    if total % per_micro:
        raise UsageError(
            f"total batch {total} tokens is not a multiple of device batch x sequence x "
            f"processes = {device_batch} x {seq_len} x {processes} = {per_micro}; "
            "change --device-batch or --total-batch"
        )
    horizon = steps or max(1, math.ceil(ratio * scaling / total))
    return Dial(
        depth, vocab_size, seq_len, device_batch, processes, ratio, scaling, total,
        total // per_micro, horizon,
    )  # fmt: skip
