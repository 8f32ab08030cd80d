"""Bits per byte: the tokenizer-independent loss used to compare models.

bpb = sum of the per-token cross-entropies (nats) over target tokens that stand for at
least one byte, divided by ln 2 times those tokens' total bytes. Special tokens (0 bytes)
count neither way, so two models with different vocabularies compare fairly. Used by
pretraining (val bpb every N steps) and by ``scripts.base_eval``; sums are all-reduced
across ranks when torch.distributed is running.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nanochat.tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer, device: str | torch.device = "cpu") -> torch.Tensor:
    """Bytes per token id (0 for special tokens), as a tensor for indexing by targets."""
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long, device=device)


@torch.no_grad()
def loss_sums(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int | None,
    bytes_per_token: torch.Tensor,
) -> tuple[float, int, float, int]:
    """Over ``steps`` batches (None: until ``batches`` ends), summed over ranks (targets < 0
    are ignored): (nats of every target token, their count, nats of the tokens that stand for
    text, those tokens' bytes). Special tokens' bytes count neither way. Every rank must call
    it (the sums are all-reduced), even one with no batches."""
    sums = torch.zeros(4, dtype=torch.float64, device=bytes_per_token.device)
    for inputs, targets in itertools.islice(batches, steps):
        nats = model(inputs, targets, loss_reduction="none").reshape(-1).double()
        flat = targets.reshape(-1)
        nbytes = torch.where(flat >= 0, bytes_per_token[flat.clamp(min=0)], 0)
        sums += torch.stack(
            [nats.sum(), (flat >= 0).sum(), (nats * (nbytes > 0)).sum(), nbytes.sum()]
        ).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    nats_all, tokens, nats_text, text_bytes = sums.tolist()
    return nats_all, int(tokens), nats_text, int(text_bytes)


def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int | None,
    bytes_per_token: torch.Tensor,
) -> float:
    """Bits per byte of ``model`` over ``steps`` batches, or all of them (None); targets < 0
    are ignored."""
    _, _, nats, total_bytes = loss_sums(model, batches, steps, bytes_per_token)
    if total_bytes == 0:
        raise ValueError("no target bytes to evaluate: the batches held only special tokens")
    return nats / (math.log(2) * total_bytes)
