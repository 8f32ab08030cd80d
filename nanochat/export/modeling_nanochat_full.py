"""nanochat's GPT as a Hugging Face transformers model: every feature of the recipe, nothing
dropped. This file travels inside every exported folder (``make export``) and is loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; it imports only
torch and transformers, never the nanochat package.

Why not transformers' own ``nanochat`` class: it scales attention scores by 1/sqrt(head_dim)
after QK-norm, while the recipe multiplies queries and keys by 1.2 after the norm (scores
x1.44), and it has no value embeddings, residual scalars, smear, backout or sliding windows.
Its weights would load and compute something else, so the export never targets it.

The computation, layer by layer (the same as ``nanochat/model/gpt.py``; the parity tests
hold the two to 1e-4 on the logits and to the token on greedy decoding):

- x = rms_norm(embed(ids)); with ``smear``: x[t] += lambda * sigmoid(gate(x[t][:24])) * x[t-1]
  (x[t-1] from the cache when decoding: the normalized embeddings are kept in one extra
  cache layer, index num_hidden_layers, so beam search and cropping treat them like keys).
- Per layer i: with ``residual_scalars`` x = resid_lambdas[i] x + x0_lambdas[i] x0 (x0: the
  embedding after smear); x += attn(rms_norm(x)); x += fc2(relu(fc1(rms_norm(x)))^2).
- Attention: q, k = rotary(rms_norm(q, k) * qk_scale) (channel i pairs with i + head_dim/2,
  base rope_theta); on the ``value_embed_layers`` v += 3 sigmoid(ve_gate(x[:12])) *
  value_embeds[i](ids) per kv head; causal, optionally a window of the last
  ``attention_windows[i]`` positions; GQA when num_key_value_heads < num_attention_heads.
- With ``backout``: x -= backout_lambda * (x after layer num_hidden_layers // 2).
- logits = softcap * tanh(lm_head(rms_norm(x)) / softcap), in float32.

RMSNorm has no gain and uses torch's default epsilon for the input's dtype, as the recipe.
Attention runs through torch's scaled_dot_product_attention with the model's own masks
(causal, window, padding). Another attention implementation (``attn_implementation=`` a
kernel, or vLLM's transformers backend, which sets its own) is refused in one line: smear
needs the previous token's embedding while decoding, kept in this model's cache, and the
windows differ per layer; an outside kernel would silently drop both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

LOCAL_ATTENTION = (None, "eager", "sdpa")  # both run torch's SDPA with the model's own masks


class NanochatFullConfig(PreTrainedConfig):
    """The shape and features of an exported nanochat model (written by ``make export``)."""

    model_type = "nanochat_full"

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 100_000.0,
        qk_scale: float = 1.2,
        final_logit_softcapping: float = 15.0,
        attention_windows: list | None = None,
        value_embed_layers: list | None = None,
        value_embed_gate_channels: int = 12,
        value_embed_gate_range: float = 3.0,
        residual_scalars: bool = False,
        smear: bool = False,
        smear_channels: int = 24,
        backout: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.qk_scale = qk_scale
        self.final_logit_softcapping = final_logit_softcapping
        self.attention_windows = list(attention_windows or [None] * num_hidden_layers)
        self.value_embed_layers = list(value_embed_layers or [])
        self.value_embed_gate_channels = value_embed_gate_channels
        self.value_embed_gate_range = value_embed_gate_range
        self.residual_scalars = residual_scalars
        self.smear = smear
        self.smear_channels = smear_channels
        self.backout = backout
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (B, H, T, D): channel i pairs with channel i + D/2."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class NanochatFullAttention(nn.Module):
    def __init__(self, config: NanochatFullConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.window = config.attention_windows[layer_idx]
        self.is_causal = True
        width, kv_width = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, kv_width, bias=False)
        self.v_proj = nn.Linear(width, kv_width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.ve_gate = None
        if layer_idx in config.value_embed_layers:
            gate_in = min(config.value_embed_gate_channels, width)
            self.ve_gate = nn.Linear(gate_in, self.num_kv_heads, bias=False)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, n, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, masks, cache, value_embed):
        batch, length, width = x.shape
        q = self.heads(self.q_proj(x), self.num_heads)
        k = self.heads(self.k_proj(x), self.num_kv_heads)
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        if self.ve_gate is not None:
            gate = self.config.value_embed_gate_range * torch.sigmoid(
                self.ve_gate(x[..., : self.ve_gate.in_features])
            )
            mixed = gate.transpose(1, 2).unsqueeze(-1) * self.heads(value_embed, self.num_kv_heads)
            v = v + mixed.to(v.dtype)
        scale = self.config.qk_scale
        q = rotate(rms_norm(q) * scale, cos, sin).to(v.dtype)
        k = rotate(rms_norm(k) * scale, cos, sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = self.local_attention(q, k, v, masks[self.window])
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, width))

    def local_attention(self, q, k, v, mask):
        if self.num_key_value_groups > 1:
            k = k.repeat_interleave(self.num_key_value_groups, dim=1)
            v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class NanochatFullMLP(nn.Module):
    def __init__(self, config: NanochatFullConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


class NanochatFullDecoderLayer(nn.Module):
    def __init__(self, config: NanochatFullConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NanochatFullAttention(config, layer_idx)
        self.mlp = NanochatFullMLP(config)

    def forward(self, x, cos, sin, masks, cache, value_embed):
        x = x + self.self_attn(rms_norm(x), cos, sin, masks, cache, value_embed)
        return x + self.mlp(rms_norm(x))


class NanochatFullPreTrainedModel(PreTrainedModel):
    config_class = NanochatFullConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanochatFullDecoderLayer"]
    _supports_sdpa = True
    # Not the attention interface vLLM's transformers backend needs: check_inputs says why.
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights a folder lacks (an exported folder has them all; transformers'
        ``initialization`` functions skip the loaded ones): the recipe's neutral values."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, NanochatFullModel):
            if self.config.residual_scalars:
                init.ones_(module.resid_lambdas)
                init.zeros_(module.x0_lambdas)
            if self.config.smear:
                init.zeros_(module.smear_lambda)
            if self.config.backout:
                init.zeros_(module.backout_lambda)


def check_inputs(config, attention_mask, cache, options: dict) -> None:
    """Refuse, in one line, what this model would otherwise ignore or get wrong."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in LOCAL_ATTENTION:
        raise ValueError(
            f"nanochat_full runs with attn_implementation 'sdpa' or 'eager', not {impl!r}: "
            "its smear (previous-token state) and per-layer windows would be lost"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("nanochat_full takes a 2-D attention_mask (1 = token, 0 = padding)")
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"nanochat_full decodes with a DynamicCache, not {type(cache).__name__} "
            "(cache_implementation='static' and friends are not supported)"
        )
    asked = [name for name in ("output_attentions", "output_hidden_states") if options.get(name)]
    if asked:
        raise ValueError(f"nanochat_full does not return {', '.join(asked)}")


def window_mask(past: int, length: int, window, keep_keys, device) -> torch.Tensor | None:
    """Which cache slots each new position may see (True = attend), (B or 1, 1, T, S), or
    None for plain causal attention over a fresh sequence. Slots count from the cache's
    start, so left padding (masked through ``keep_keys``) shifts nothing."""
    keys = past + length
    if past == 0 and keep_keys is None and (window is None or window >= keys):
        return None
    query = torch.arange(past, keys, device=device).unsqueeze(1)
    key = torch.arange(keys, device=device).unsqueeze(0)
    keep = key <= query
    if window is not None:
        keep = keep & (key > query - window)
    keep = keep[None, None]
    if keep_keys is not None:
        # Padding is seen by no one; a padding position sees itself, so no row of the
        # softmax is empty (an empty row is NaN, and NaN spreads through later layers).
        keep = (keep & keep_keys[:, None, None, :]) | (key == query)[None, None]
    return keep


class NanochatFullModel(NanochatFullPreTrainedModel):
    def __init__(self, config: NanochatFullConfig):
        super().__init__(config)
        layers, width = config.num_hidden_layers, config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, width)
        self.layers = nn.ModuleList(NanochatFullDecoderLayer(config, i) for i in range(layers))
        kv_width = config.num_key_value_heads * config.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(config.vocab_size, kv_width) for i in config.value_embed_layers}
        )
        if config.residual_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(layers))
        if config.smear:
            self.smear_gate = nn.Linear(min(config.smear_channels, width), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def rotary(self, position_ids: torch.Tensor):
        """cos and sin of the rotary angles, (B, 1, T, head_dim / 2), float32. Computed per
        call, not kept in a buffer: transformers builds models on the meta device, where a
        buffer that is not in the weights file would stay uninitialized."""
        dim = self.config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim
        inv_freq = 1.0 / (self.config.rope_theta**exponents)
        angles = position_ids[..., None].float() * inv_freq
        return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, D/2)

    def smear(self, x: torch.Tensor, cache: Cache | None, past: int, keep_keys) -> torch.Tensor:
        """x[t] + lambda * sigmoid(gate(x[t][:24])) * x[t-1]; a sequence's first token (and a
        token after left padding, ``keep_keys`` False) has no predecessor."""
        channels = self.smear_gate.in_features
        gate = (self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :channels]))).to(x.dtype)
        before = None
        if cache is not None:
            seen, _ = cache.update(x.unsqueeze(1), x.unsqueeze(1), self.config.num_hidden_layers)
            before = seen[:, 0, past - 1 : past] if past > 0 else None
        if keep_keys is not None:  # slots of the predecessors: past - 1 .. past + T - 2
            length = x.size(1)
            kept = keep_keys[:, max(past - 1, 0) : past + length - 1, None].to(x.dtype)
            gate = gate * torch.cat((gate.new_zeros(x.size(0), 1, 1), kept), 1)[:, -length:]
        if before is None:
            return torch.cat((x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]), dim=1)
        return x + gate * torch.cat((before.to(x.dtype), x[:, :-1]), dim=1)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, **kwargs
    ) -> BaseModelOutputWithPast:
        check_inputs(self.config, attention_mask, cache, kwargs)
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device)[None]
        cos, sin = self.rotary(position_ids)
        keep_keys = None
        if attention_mask is not None and not attention_mask.all():
            keep_keys = attention_mask[:, -(past + length) :].bool()
        masks = {
            w: window_mask(past, length, w, keep_keys, input_ids.device)
            for w in set(self.config.attention_windows)
        }
        x = rms_norm(self.embed_tokens(input_ids))
        if self.config.smear:
            if cache is not None and len(cache.layers) <= self.config.num_hidden_layers:
                cache.layers.append(DynamicLayer())  # the extra layer: past embeddings
            x = self.smear(x, cache, past, keep_keys)
        x0, middle = x, None
        for i, layer in enumerate(self.layers):
            if self.config.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = (
                self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            )
            x = layer(x, cos, sin, masks, cache, value_embed)
            if i == self.config.num_hidden_layers // 2:
                middle = x
        if self.config.backout:
            x = x - (self.backout_lambda * middle).to(x.dtype)
        return BaseModelOutputWithPast(last_hidden_state=rms_norm(x), cache=cache)


class NanochatFullForCausalLM(NanochatFullPreTrainedModel, GenerationMixin):
    def __init__(self, config: NanochatFullConfig):
        super().__init__(config)
        self.model = NanochatFullModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("nanochat takes input_ids (its value embeddings look tokens up)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        hidden = self.model(input_ids, attention_mask, position_ids, cache, **kwargs)
        hidden = hidden.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        cap = self.config.final_logit_softcapping
        logits = self.lm_head(hidden).float()
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


__all__ = ["NanochatFullConfig", "NanochatFullForCausalLM", "NanochatFullModel"]
