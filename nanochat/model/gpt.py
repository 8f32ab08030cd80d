"""The GPT decoder: the Transformer that every training stage optimizes and every chat stage runs.

Pretraining (``scripts/base_train.py``) builds it with ``build_model(config_for_depth(...))``,
midtraining, SFT and RL continue from its checkpoints, and the inference engine samples from it
through ``KVCache``. Facts from the recipe (upstream nanochat):

- One size dial, the depth: width = 64 * depth rounded up to a multiple of 128, heads of
  dimension 128 (d12 = 768 wide with 6 heads, d20 = 1280, d24 = 1536, d26 = 1664).
- Pre-norm residual blocks; RMSNorm without a learnable gain everywhere (after the token
  embedding, before attention and MLP, on queries and keys, before the head); no biases.
- Attention: rotary embeddings with base 100,000, QK-norm then q and k scaled by 1.2, causal
  scaled-dot-product attention (flash kernels on CUDA), GQA/MQA when n_kv_head < n_head.
- MLP 4x wide with ReLU squared. Untied embedding (``wte``) and head (``lm_head``); the logits
  are soft-capped as 15 * tanh(z / 15), in fp32.
- Init: embedding normal(0, 0.8), head normal(0, 0.001), q/k/v and MLP input weights uniform
  with std 1/sqrt(width), output projections zero (every block starts as the identity).

Optional extras (GPTConfig flags; which are on by default is the ablation's call, see
docs/benchmarks.md; facts from upstream nanochat 2026):
``residual_scalars`` (per-layer ``resid_lambdas`` and ``x0_lambdas`` mixing the residual stream
with the normalized input embedding before each block), ``value_embeds`` (ResFormer-style value
embeddings on alternating layers, last layer included, mixed into v through a gate
3 * sigmoid(linear of the first 12 channels) per kv head), ``window_pattern`` (e.g. "SSSL": S
layers attend to the last quarter of the context; the pattern is
tiled over the layers and the last layer is always L), ``smear`` (each position adds
lambda * sigmoid(linear of its first 24 channels) times the previous position's embedding;
lambda starts at 0) and ``backout`` (a learned 0.2 times the residual after the middle block is
taken out before the final norm). Attention and the KV cache live in
``nanochat.model.attention``.

The weights stay fp32 (the optimizer's master copy); on CUDA the caller runs forward under
``torch.autocast(dtype=torch.bfloat16)``. The module is built on the meta device and
initialized explicitly (``build_model``), so a large model never exists twice in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.model.attention import (
    CausalSelfAttention,
    KVCache,
    attention_mask,
    has_value_embed,
    norm,
    rotary_tables,
)
from nanochat.model.dial import HEAD_DIM, MLP_RATIO, SEQ_LEN
from nanochat.model.dial import width as dial_width
from nanochat.model.head_loss import softcapped_cross_entropy

__all__ = ["GPT", "GPTConfig", "KVCache", "build_model", "config_for_depth", "norm"]

ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10x the training context, for inference
LOGIT_SOFTCAP = 15.0
EMBEDDING_STD = 0.8
HEAD_STD = 0.001
# residual_scalars (upstream's init): layer i of L starts at resid 1.15 - 0.10 i/(L-1) and
# x0 0.20 - 0.15 i/(L-1), leaning on the input embedding early and less later.
RESID_LAMBDA_INIT, RESID_LAMBDA_DROP = 1.15, 0.10
X0_LAMBDA_INIT, X0_LAMBDA_DROP = 0.20, 0.15
SMEAR_CHANNELS = 24  # smear: its gate reads the first 24 channels of the embedding
GATE_INIT_MAX = 0.02  # smear and value-embedding gates start uniform(0, 0.02)
BACKOUT_INIT = 0.2  # backout: the share of the middle residual taken out before the head
LOSS_REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape. ``config_for_depth`` derives it from one number, the depth.

    The optional fields default to the plain model (every extra off): that is what a
    checkpoint saved without the field holds. Which extras a new run turns on is the
    recipe's choice (``nanochat.training.recipe``), not these defaults."""

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    sequence_len: int = SEQ_LEN
    window_pattern: str = "L"  # "L" = full attention in every layer
    residual_scalars: bool = False
    value_embeds: bool = False
    smear: bool = False
    backout: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dimension must be even for rotary, got {self.head_dim}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}): "
                "each key/value head serves a whole group of query heads (GQA/MQA)"
            )
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(
                f"window_pattern must be a non-empty string of S (short window) and "
                f"L (full context), got {self.window_pattern!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_for_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int = SEQ_LEN,
    n_kv_head: int | None = None,
    **extras,
) -> GPTConfig:
    """The depth dial (``nanochat.model.dial``, the one place its numbers live): depth
    layers, width 64*depth rounded up to 128, heads of 128.

    ``n_kv_head`` defaults to the number of query heads (plain multi-head attention);
    ``extras`` are GPTConfig's optional flags (window_pattern, residual_scalars, value_embeds,
    smear, backout).
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    width = dial_width(depth)
    n_head = width // HEAD_DIM
    return GPTConfig(
        vocab_size=vocab_size,
        n_layer=depth,
        n_embd=width,
        n_head=n_head,
        n_kv_head=n_head if n_kv_head is None else n_kv_head,
        sequence_len=sequence_len,
        **extras,
    )


def short_window(config: GPTConfig) -> int:
    """How many positions (itself included) a query of an S layer sees: a quarter of the
    context (512 at 2048, as upstream)."""
    return max(1, config.sequence_len // 4)


def window_sizes(config: GPTConfig) -> list[int | None]:
    """Per layer: the attention window in positions (query included), or None for full context.

    The pattern is tiled over the layers; the last layer always sees the full context.
    """
    pattern = config.window_pattern.upper()
    sizes = [
        short_window(config) if pattern[i % len(pattern)] == "S" else None
        for i in range(config.n_layer)
    ]
    sizes[-1] = None
    return sizes


class MLP(nn.Module):
    """Two matrices, 4x wide, ReLU squared in between."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, MLP_RATIO * config.n_embd, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, rotary, mask, window, kv_cache=None, value_embed=None):
        x = x + self.attn(norm(x), rotary, mask, window, kv_cache, value_embed)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """The decoder. Construct on the meta device and call ``init_weights`` (see build_model)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.residual_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.value_embeds:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict(
                {
                    str(i): nn.Embedding(config.vocab_size, kv_dim)
                    for i in range(config.n_layer)
                    if has_value_embed(i, config.n_layer)
                }
            )
        if config.smear:
            self.smear_gate = nn.Linear(min(SMEAR_CHANNELS, config.n_embd), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # Placeholders on the meta device; init_weights computes the real tables.
        cos, sin = rotary_tables(self.rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def rotary_len(self) -> int:
        """Positions the rotary tables cover (training context x ROTARY_LENGTH_FACTOR)."""
        return self.config.sequence_len * ROTARY_LENGTH_FACTOR

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer (after ``to_empty``); see the module docstring."""
        config = self.config
        bound = math.sqrt(3) / math.sqrt(config.n_embd)  # uniform with std 1/sqrt(width)
        nn.init.normal_(self.wte.weight, mean=0.0, std=EMBEDDING_STD)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=HEAD_STD)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for linear in (attn.c_q, attn.c_k, attn.c_v, mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.zeros_(mlp.c_proj.weight)
            if attn.ve_gate is not None:
                nn.init.uniform_(attn.ve_gate.weight, 0.0, GATE_INIT_MAX)
        if config.residual_scalars:
            depth = torch.arange(config.n_layer, dtype=torch.float32) / max(config.n_layer - 1, 1)
            self.resid_lambdas.copy_(RESID_LAMBDA_INIT - RESID_LAMBDA_DROP * depth)
            self.x0_lambdas.copy_(X0_LAMBDA_INIT - X0_LAMBDA_DROP * depth)
        if config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, GATE_INIT_MAX)
            self.smear_lambda.zero_()
        if config.backout:
            self.backout_lambda.fill_(BACKOUT_INIT)
        if config.value_embeds:
            for embedding in self.value_embeds.values():
                nn.init.uniform_(embedding.weight, -bound, bound)
        self.cos, self.sin = rotary_tables(
            self.rotary_len, config.head_dim, device=self.wte.weight.device
        )

    def cast_embeddings(self, dtype: torch.dtype) -> None:
        """Store the embedding tables in ``dtype`` (bf16 on CUDA saves memory and bandwidth)."""
        self.wte.to(dtype=dtype)
        if self.config.value_embeds:
            self.value_embeds.to(dtype=dtype)

    def smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Mix each position's predecessor into it: x[t] + lambda * sigmoid(gate(x[t][:24]))
        * x[t-1]. Position 0 of a sequence has no predecessor; with a cache, the first new
        token's predecessor is the last cached one (kept in ``kv_cache.prev_embed``)."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        gate = gate.to(x.dtype)
        before = None if kv_cache is None or kv_cache.pos == 0 else kv_cache.prev_embed
        if before is None:
            return torch.cat((x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]), dim=1)
        previous = torch.cat((before.to(x.dtype), x[:, :-1]), dim=1)
        return x + gate * previous

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32; with ``targets``, the cross-entropy instead.

        Targets of -1 are ignored. ``loss_reduction="none"`` gives the per-token losses,
        shaped like ``targets`` (0 where ignored), for bits-per-byte. With a ``kv_cache`` the
        tokens continue the cached sequence: they attend to every cached position and take
        their rotary angles from their absolute positions.
        """
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}")
        _, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.rotary_len:
            raise ValueError(
                f"position {start + T} is past the rotary tables ({self.rotary_len} positions)"
            )
        rotary = (self.cos[start : start + T], self.sin[start : start + T])
        # Training on CUDA needs no mask (FlashAttention-3 or flex attention take the window,
        # SDPA's is_causal the full layers); masks are for the CPU and cached decoding.
        needs_mask = kv_cache is not None or not idx.is_cuda
        masks = {
            w: attention_mask(start, T, w, idx.device) if needs_mask else None
            for w in set(self.window_sizes)
        }

        x = norm(self.wte(idx))
        last_embed = x[:, -1:].detach()  # smear: the next call's predecessor, once cached
        if self.config.smear:
            x = self.smear(x, kv_cache)
        x0 = x
        middle = None
        for i, block in enumerate(self.blocks):
            if self.config.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = None
            if block.attn.ve_gate is not None:
                value_embed = self.value_embeds[str(i)](idx)
            window = self.window_sizes[i]
            x = block(x, rotary, masks[window], window, kv_cache, value_embed)
            if i == self.config.n_layer // 2:
                middle = x
        if kv_cache is not None:
            kv_cache.advance(T)
            kv_cache.prev_embed = last_embed
        if self.config.backout:
            x = x - (self.backout_lambda * middle).to(x.dtype)

        x = norm(x)
        fusable = not (x.is_cuda or torch.compiler.is_compiling()) and torch.is_grad_enabled()
        if targets is not None and loss_reduction == "mean" and fusable:
            if x.dtype == torch.float32 and self.lm_head.weight.dtype == torch.float32:
                # CPU training: the fused, chunked head loss (never the whole logits)
                return softcapped_cross_entropy(
                    x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                    LOGIT_SOFTCAP,
                )  # fmt: skip
        logits = self.lm_head(x).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-1,
            reduction=loss_reduction,
        )
        return loss if loss_reduction == "mean" else loss.view(targets.shape)


def build_model(
    config: GPTConfig, device: torch.device | str, embedding_dtype: torch.dtype | None = None
) -> GPT:
    """Build on the meta device, allocate on ``device``, initialize; optionally cast embeddings."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if embedding_dtype is not None:
        model.cast_embeddings(embedding_dtype)
    return model


def param_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """The parameters by optimizer treatment (the names nanochat/training/optim.py expects).

    "matrices": the 2-D matrices inside the blocks, value-embedding gates included (Muon);
    AdamW for the rest: "embedding" (wte), "value_embeds", "head", "resid_scalars"
    (resid_lambdas), "scalars" (x0_lambdas), "gates" (smear and backout). A group is empty
    when its feature is off.
    """
    groups: dict[str, list[nn.Parameter]] = {
        name: []
        for name in (
            "matrices", "embedding", "value_embeds", "head", "resid_scalars", "scalars", "gates"
        )
    }  # fmt: skip
    by_prefix = {
        "wte.": "embedding",
        "value_embeds.": "value_embeds",
        "lm_head.": "head",
        "resid_lambdas": "resid_scalars",
        "x0_lambdas": "scalars",
        "smear_": "gates",
        "backout_": "gates",
    }
    for name, param in model.named_parameters():
        if name.startswith("blocks.") and param.ndim == 2:
            groups["matrices"].append(param)
            continue
        group = next((g for prefix, g in by_prefix.items() if name.startswith(prefix)), None)
        if group is None:
            raise ValueError(f"parameter {name} fits no optimizer group")
        groups[group].append(param)
    return groups


def num_params(model: nn.Module) -> int:
    """Every parameter, embeddings included."""
    return sum(p.numel() for p in model.parameters())


def scaling_params(model: GPT) -> int:
    """Block matrices + head: the count that sets the data budget (tokens = ratio * this).
    The value-embedding gates (a few numbers per layer) are not counted, so the budget of a
    depth does not move with the features."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if (name.startswith("blocks.") and p.ndim == 2 and "ve_gate" not in name)
        or name.startswith("lm_head.")
    )


def meta_model(config: GPTConfig) -> GPT:
    """The model's structure on the meta device: free to build, for counting only."""
    with torch.device("meta"):
        return GPT(config)


def scaling_params_of(config: GPTConfig) -> int:
    """``scaling_params`` of the model ``config`` describes, without building it."""
    return scaling_params(meta_model(config))


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token: 6 * matmul parameters + per layer 12 * heads * head_dim * context.

    The matmul parameters are the block matrices and the head (embedding lookups are not
    matmuls). The context of a sliding-window layer is its window (capped at sequence_len).
    """
    attention = sum(
        12 * config.n_head * config.head_dim * min(w or config.sequence_len, config.sequence_len)
        for w in window_sizes(config)
    )
    return 6 * scaling_params_of(config) + attention
