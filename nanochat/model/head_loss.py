"""The head's training loss, fused and chunked: lm_head -> soft-cap -> cross-entropy.

Used by ``GPT.forward`` when it trains on the CPU (gradients on, not compiling). The plain
path materializes the fp32 logits of every position several times over (the matmul's
output, the soft-capped copy, the log-softmax that autograd keeps): at the tiny preset's
16 x 256 positions and 4,096 tokens that is 64 MB a copy, allocated and faulted in on every
micro-step. Here the rows go through in chunks of about ``CHUNK_ELEMENTS`` logits, and each
chunk's gradients with respect to the hidden states and the head's weight are computed
right away, in the forward pass, since the loss is the last op (the "fused linear
cross-entropy" idea); backward only scales them. Peak extra memory is one chunk's logits;
the flops are the plain path's (one matmul forward, two backward).

The math, for a row with hidden state h, head W, cap c and target y (rows with y = -1 are
ignored and the mean is over the n rows that are not):
    z = c * tanh(W h / c),   loss = logsumexp(z) - z_y
    d loss / d (W h) = (softmax(z) - onehot(y)) * (1 - tanh(W h / c) ** 2)
On CUDA, and under ``torch.compile`` anywhere, the plain path stays (the compiler fuses it).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**21  # logits per chunk: 8 MB in fp32


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, rows):
        valid = targets != -1
        count = valid.sum()  # a tensor: no sync with the device
        per_row = valid.to(torch.float32) / count.clamp(min=1)  # each kept row's share
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.size(0), rows):
            h = hidden[start : start + rows]
            y = targets[start : start + rows]
            keep = valid[start : start + rows]
            capped = torch.tanh(h @ weight.t() / softcap)  # tanh(W h / c), in place from here
            z = capped * softcap
            lse = torch.logsumexp(z, dim=-1)
            safe_y = y.clamp(min=0).unsqueeze(1)
            total += ((lse - z.gather(1, safe_y).squeeze(1)) * keep).sum()
            if not (want_hidden or want_weight):
                continue
            probs = z.sub_(lse.unsqueeze(1)).exp_()  # softmax(z), in z's storage
            probs.scatter_add_(1, safe_y, -keep.to(probs.dtype).unsqueeze(1))
            probs.mul_(per_row[start : start + rows].unsqueeze(1))
            grad_logits = probs.mul_(capped.mul_(capped).neg_().add_(1))
            if want_hidden:
                grad_hidden[start : start + rows] = grad_logits @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count  # 0 / 0 = nan when every row is ignored, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        return (
            grad_hidden * scale if grad_hidden is not None else None,
            grad_weight * scale if grad_weight is not None else None,
            None,
            None,
            None,
        )


def softcapped_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float
) -> torch.Tensor:
    """Mean cross-entropy of ``softcap * tanh(hidden @ weight.T / softcap)`` against
    ``targets`` (-1 ignored): ``hidden`` (N, d) and ``weight`` (V, d) in fp32, ``targets`` (N,).
    Equals ``F.cross_entropy`` of the plain path, gradients included, without keeping the
    (N, V) logits."""
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        raise TypeError(f"fp32 only, got {hidden.dtype} and {weight.dtype}")
    return _SoftcappedCrossEntropy.apply(
        hidden, weight, targets, softcap, chunk_rows(weight.size(0))
    )
