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

Optional extras, off by default until a measurement turns them on (GPTConfig flags):
``residual_scalars`` (per-layer ``resid_lambdas`` and ``x0_lambdas`` mixing the residual stream
with the normalized input embedding), ``value_embeds`` (ResFormer-style value embeddings on
alternating layers, last layer included, mixed into v through a learned per-head gate) and
``window_pattern`` (e.g. "SSSL": S layers attend to the last sequence_len/4 positions only,
L layers to everything; the pattern is tiled over the layers and the last layer is always L).

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

from nanochat.model.dial import HEAD_DIM, MLP_RATIO, SEQ_LEN
from nanochat.model.dial import width as dial_width

try:  # FlashAttention-3 (Hopper) when installed; PyTorch's SDPA otherwise.
    from flash_attn_interface import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

ROTARY_BASE = 100_000
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10x the training context, for inference
QK_SCALE = 1.2  # q and k are multiplied by this after QK-norm
LOGIT_SOFTCAP = 15.0
EMBEDDING_STD = 0.8
HEAD_STD = 0.001
X0_LAMBDA_INIT = 0.1  # residual_scalars: initial weight of the input embedding in each layer
VE_GATE_CHANNELS = 32  # value_embeds: the gate reads the first 32 channels of the block input
LOSS_REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape. ``config_for_depth`` derives it from one number, the depth."""

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    sequence_len: int = SEQ_LEN
    window_pattern: str = "L"  # "L" = full attention in every layer
    residual_scalars: bool = False
    value_embeds: bool = False

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
    ``extras`` are GPTConfig's optional flags (window_pattern, residual_scalars, value_embeds).
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
    """How many positions (itself included) a query of an S layer sees: a quarter of the context."""
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


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Value embeddings sit on alternating layers, counted so that the last layer has one."""
    return layer % 2 == (n_layer - 1) % 2


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, without a learnable gain."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(
    length: int, head_dim: int, base: float = ROTARY_BASE, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, fp32, each of shape (length, head_dim // 2).

    Channel pair i of position t turns by t * base^(-2i/head_dim).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (base**exponents)
    positions = torch.arange(length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys: channel i pairs with channel i + D/2."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


def attention_mask(
    start: int, n_queries: int, window: int | None, device=None
) -> torch.Tensor | None:
    """Which keys each query may see (True = attend), or None for plain causal attention.

    Queries sit at absolute positions start .. start+n_queries-1 and keys at 0 .. the last
    query's position (cached keys first). A query at position p sees keys k with k <= p
    and, with a window w, k > p - w. None means queries and keys coincide (no cached
    prefix) and the window cuts nothing, so SDPA's ``is_causal`` does the same job faster.
    """
    n_keys = start + n_queries
    if start == 0 and (window is None or window >= n_keys):
        return None
    query_pos = torch.arange(start, n_keys, device=device).unsqueeze(1)
    key_pos = torch.arange(n_keys, device=device).unsqueeze(0)
    keep = key_pos <= query_pos
    if window is not None:
        keep = keep & (key_pos > query_pos - window)
    return keep


def flash_usable(q: torch.Tensor) -> bool:
    """FlashAttention-3 runs when installed, on CUDA, in half precision."""
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Causal attention through FlashAttention-3; (B, H, T, D) in and out, GQA native."""
    left = -1 if window is None else window - 1  # FA counts the keys before the query
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        causal=True,
        window_size=(left, 0),
    )
    if isinstance(out, tuple):  # some FA3 versions also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


class KVCache:
    """Keys and values of the positions seen so far, for one-token-at-a-time decoding.

    Preallocated per layer as (batch, n_kv_head, max_len, head_dim); ``pos`` is how many
    positions are filled. ``GPT.forward`` inserts each layer's new keys and values with
    ``insert`` (which returns the filled prefix for attention) and calls ``advance`` once all
    layers are done. Sampling N continuations of one prompt: prefill a batch-1 cache with the
    prompt, then ``expand(N)`` copies it into N rows.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def for_config(
        cls,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache shaped for ``config``, holding up to ``max_len`` positions."""
        return cls(
            config.n_layer,
            batch_size,
            config.n_kv_head,
            config.head_dim,
            max_len,
            device=device,
            dtype=dtype,
        )

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self) -> None:
        """Forget every position (the memory is reused)."""
        self.pos = 0

    def insert(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv_head, T, head_dim) keys/values at ``pos``; return all filled so far."""
        if k.size(0) != self.batch_size:
            raise ValueError(
                f"batch of {k.size(0)} rows does not match the cache's {self.batch_size} "
                "(expand the cache first)"
            )
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions, room for {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_positions: int) -> None:
        self.pos += n_positions

    def expand(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A new cache of ``batch_size`` rows, each a copy of this (batch 1) cache's prefix."""
        if self.batch_size not in (1, batch_size):
            raise ValueError(f"can not expand {self.batch_size} rows to {batch_size}")
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.pos:
            raise ValueError(f"max_len {max_len} is shorter than the {self.pos} cached positions")
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        new = KVCache(
            n_layer, batch_size, n_kv_head, head_dim, max_len, self.k.device, self.k.dtype
        )
        new.k[:, :, :, : self.pos] = self.k[:, :, :, : self.pos]
        new.v[:, :, :, : self.pos] = self.v[:, :, :, : self.pos]
        new.pos = self.pos
        return new


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary positions, QK-norm and optional GQA."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = None
        if config.value_embeds and has_value_embed(layer, config.n_layer):
            gate_in = min(VE_GATE_CHANNELS, config.n_embd)
            self.ve_gate = nn.Linear(gate_in, config.n_kv_head, bias=False)

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(B, T, heads * D) -> (B, heads, T, D)."""
        B, T, _ = x.shape
        return x.view(B, T, n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        window: int | None,
        kv_cache: KVCache | None = None,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.split_heads(self.c_q(x), self.n_head)
        k = self.split_heads(self.c_k(x), self.n_kv_head)
        v = self.split_heads(self.c_v(x), self.n_kv_head)
        if value_embed is not None:
            # ResFormer value residual: gate in (0, 2) per kv head, 1 at init (zero weights).
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.transpose(1, 2).unsqueeze(-1) * self.split_heads(
                value_embed, self.n_kv_head
            )
        cos, sin = rotary
        q = apply_rotary(norm(q) * QK_SCALE, cos, sin).to(v.dtype)
        k = apply_rotary(norm(k) * QK_SCALE, cos, sin).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if kv_cache is None and flash_usable(q):
            y = flash_attention(q, k, v, window)
        else:
            if self.n_kv_head != self.n_head:  # each kv head serves a group of query heads
                group = self.n_head // self.n_kv_head
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


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
                nn.init.zeros_(attn.ve_gate.weight)
        if config.residual_scalars:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(X0_LAMBDA_INIT)
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
        masks = {w: attention_mask(start, T, w, idx.device) for w in set(self.window_sizes)}

        x = norm(self.wte(idx))
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.config.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = None
            if block.attn.ve_gate is not None:
                value_embed = self.value_embeds[str(i)](idx)
            window = self.window_sizes[i]
            x = block(x, rotary, masks[window], window, kv_cache, value_embed)
        if kv_cache is not None:
            kv_cache.advance(T)

        logits = self.lm_head(norm(x)).float()
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

    "matrices": the 2-D matrices inside the blocks (Muon); "embedding": token and value
    embeddings, "head": the output head, "scalars": per-layer scalars (AdamW). A group
    may be empty (no scalars when residual_scalars is off).
    """
    groups: dict[str, list[nn.Parameter]] = {
        "matrices": [],
        "embedding": [],
        "head": [],
        "scalars": [],
    }
    for name, param in model.named_parameters():
        if name.startswith("blocks.") and param.ndim == 2:
            groups["matrices"].append(param)
        elif name.startswith(("wte.", "value_embeds.")):
            groups["embedding"].append(param)
        elif name.startswith("lm_head."):
            groups["head"].append(param)
        elif param.ndim < 2:
            groups["scalars"].append(param)
        else:
            raise ValueError(f"parameter {name} fits no optimizer group")
    return groups


def num_params(model: nn.Module) -> int:
    """Every parameter, embeddings included."""
    return sum(p.numel() for p in model.parameters())


def scaling_params(model: GPT) -> int:
    """Block matrices + head: the count that sets the data budget (tokens = ratio * this)."""
    groups = param_groups(model)
    return sum(p.numel() for p in groups["matrices"] + groups["head"])


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
