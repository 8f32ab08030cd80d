"""Bits per byte: the tokenizer-independent loss used to compare models.

bpb = sum of the per-token cross-entropies (nats) over target tokens that stand for at
least one byte, divided by ln 2 times those tokens' total bytes. Special tokens (0 bytes)
count neither way, so two models with different vocabularies compare fairly. Used by
pretraining (val bpb every N steps) and by ``scripts.base_eval``; sums are all-reduced
across ranks when torch.distributed is running.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nanochat.tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer, device: str | torch.device = "cpu") -> torch.Tensor:
    """Bytes per token id (0 for special tokens), as a tensor for indexing by targets."""
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long, device=device)


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    bytes_per_token: torch.Tensor,
) -> float:
    """Bits per byte of ``model`` over ``steps`` batches (targets < 0 are ignored)."""
    nats = torch.zeros((), dtype=torch.float64, device=bytes_per_token.device)
    total_bytes = torch.zeros((), dtype=torch.long, device=bytes_per_token.device)
    for _ in range(steps):
        inputs, targets = next(batches)
        losses = model(inputs, targets, loss_reduction="none").reshape(-1).double()
        flat = targets.reshape(-1)
        nbytes = torch.where(flat >= 0, bytes_per_token[flat.clamp(min=0)], 0)
        nats += (losses * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("no target bytes to evaluate: the batches held only special tokens")
    return nats.item() / (math.log(2) * total_bytes.item())
