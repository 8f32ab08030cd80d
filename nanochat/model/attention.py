"""Attention for the GPT decoder: rotary positions, causal (optionally windowed) attention
through the fastest kernel the machine has, and the KV cache used for decoding.

Where it fits: ``nanochat.model.gpt`` builds one ``CausalSelfAttention`` per block; the
inference engine (``nanochat.inference.engine``) fills a ``KVCache``. Kernels, in order:
FlashAttention-3 when installed (Hopper, half precision, no cache); flex attention with a
block mask for sliding windows on CUDA (``torch.nn.attention.flex_attention``, compiled), so a
window no longer forces the slow masked path; PyTorch's SDPA otherwise (``is_causal`` when
nothing else is cut, a boolean mask for windows and cached prefixes). The three give equal
outputs (tests/unit/test_attention.py checks flex and SDPA against the masked reference on
the CPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlashAttention-3 (Hopper) when installed; PyTorch's SDPA otherwise.
    from flash_attn_interface import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

ROTARY_BASE = 100_000
QK_SCALE = 1.2  # q and k are multiplied by this after QK-norm
VE_GATE_CHANNELS = 12  # value_embeds: the gate reads the first 12 channels of the block input
VE_GATE_RANGE = 3.0  # value_embeds: the gate is VE_GATE_RANGE * sigmoid(.), in (0, 3)
FLEX_BLOCK = 128  # flex attention's block size


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


def flex_usable(q: torch.Tensor, window: int | None) -> bool:
    """Flex attention serves sliding windows on CUDA (where it compiles to a fused kernel)."""
    return window is not None and window < q.size(2) and q.is_cuda


@torch.compiler.disable  # built eagerly, once, even inside a compiled model (a graph break)
@functools.lru_cache(maxsize=32)
def windowed_block_mask(n: int, window: int, device: torch.device):
    """The block mask of causal attention over ``n`` positions, each query seeing itself and
    the ``window - 1`` keys before it. Built once per (length, window, device): blocks wholly
    outside the window are skipped by the kernel, not computed and masked. torch.compile
    would trace through the cache and rebuild the mask every call, so it stays outside."""
    from torch.nn.attention.flex_attention import create_block_mask

    def keep(_batch, _head, query, key):
        return (key <= query) & (key > query - window)

    return create_block_mask(keep, None, None, n, n, device=device, BLOCK_SIZE=FLEX_BLOCK)


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, compiled: bool = True
) -> torch.Tensor:
    """Causal sliding-window attention through flex attention; (B, H, T, D) in and out, GQA
    native. The kernel is compiled whatever --compile says (flex's eager path materializes
    every score: a reference, not a kernel); ``compiled=False`` runs that reference (the CPU
    tests use it)."""
    mask = windowed_block_mask(q.size(2), window, q.device)
    kernel = _flex_kernel(compiled)
    return kernel(q, k, v, block_mask=mask, enable_gqa=k.size(1) != q.size(1))


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """PyTorch's SDPA: ``is_causal`` without a mask, else the boolean mask (True = attend)."""
    if k.size(1) != q.size(1):  # each kv head serves a group of query heads
        group = q.size(1) // k.size(1)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
        # smear: the (normalized) embedding of the last cached token, (batch, 1, width)
        self.prev_embed: torch.Tensor | None = None

    @classmethod
    def for_config(
        cls,
        config,
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
        self.prev_embed = None

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
        if self.prev_embed is not None:
            new.prev_embed = self.prev_embed.expand(batch_size, -1, -1).clone()
        return new


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary positions, QK-norm and optional GQA."""

    def __init__(self, config, layer: int) -> None:
        """``config`` is the model's ``GPTConfig``; ``layer`` this block's index."""
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
            # ResFormer value residual: a gate in (0, 3) per kv head and position.
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            mixed = gate.transpose(1, 2).unsqueeze(-1) * self.split_heads(
                value_embed, self.n_kv_head
            )
            v = v + mixed.to(v.dtype)  # fp32 tables must not lift bf16 attention to fp32
        cos, sin = rotary
        q = apply_rotary(norm(q) * QK_SCALE, cos, sin).to(v.dtype)
        k = apply_rotary(norm(k) * QK_SCALE, cos, sin).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if kv_cache is None and flash_usable(q):
            y = flash_attention(q, k, v, window)
        elif kv_cache is None and flex_usable(q, window):
            y = flex_windowed_attention(q, k, v, window)
        else:
            y = sdpa_attention(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
