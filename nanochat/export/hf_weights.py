"""Our GPT's config and weights in the exported model's terms (``modeling_nanochat_full.py``).

Where it fits: ``nanochat.export.hf_folder`` calls ``hf_config`` and ``hf_state`` on a
checkpoint before writing ``config.json`` and ``model.safetensors``. Every key of our state
is renamed by one rule of ``RENAMES``; a key no rule takes, or a rule that would take a
feature the exported class lacks, stops the export with one line naming it: nothing is
dropped silently. The names follow transformers' conventions where the two models share a
part (``model.layers.N.self_attn.q_proj``, ``mlp.fc1``, ``model.embed_tokens``, ``lm_head``),
so tools that address modules by name (LoRA targets, quantizers) find the usual ones.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from nanochat.common import UsageError
from nanochat.export import EXPORT_DTYPES
from nanochat.model.attention import (
    QK_SCALE,
    ROTARY_BASE,
    VE_GATE_CHANNELS,
    VE_GATE_RANGE,
    has_value_embed,
)
from nanochat.model.dial import MLP_RATIO
from nanochat.model.gpt import LOGIT_SOFTCAP, SMEAR_CHANNELS, GPTConfig, window_sizes
from nanochat.tokenizer import Tokenizer

MODEL_TYPE = "nanochat_full"
MODELING_FILE = "modeling_nanochat_full.py"
ARCHITECTURE = "NanochatFullForCausalLM"
AUTO_MAP = {
    "AutoConfig": "modeling_nanochat_full.NanochatFullConfig",
    "AutoModel": "modeling_nanochat_full.NanochatFullModel",
    "AutoModelForCausalLM": "modeling_nanochat_full.NanochatFullForCausalLM",
}
# GPTConfig fields this export knows how to carry: a new one stops it until it is taught.
KNOWN_CONFIG = {
    "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len",
    "window_pattern", "residual_scalars", "value_embeds", "smear", "backout",
}  # fmt: skip

# (our key pattern, the exported key); groups carry the layer number.
RENAMES = (
    (r"wte\.weight", "model.embed_tokens.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attn\.c_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blocks\.(\d+)\.attn\.c_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blocks\.(\d+)\.attn\.c_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blocks\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blocks\.(\d+)\.attn\.ve_gate\.weight", r"model.layers.\1.self_attn.ve_gate.weight"),
    (r"blocks\.(\d+)\.mlp\.c_fc\.weight", r"model.layers.\1.mlp.fc1.weight"),
    (r"blocks\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.fc2.weight"),
    (r"value_embeds\.(\d+)\.weight", r"model.value_embeds.\1.weight"),
    (r"resid_lambdas", "model.resid_lambdas"),
    (r"x0_lambdas", "model.x0_lambdas"),
    (r"smear_gate\.weight", "model.smear_gate.weight"),
    (r"smear_lambda", "model.smear_lambda"),
    (r"backout_lambda", "model.backout_lambda"),
)
DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPES}


def exported_name(key: str) -> str:
    """The exported model's name for one of our state keys; UsageError for a key no rule
    takes (a feature this exporter does not know: refusing beats dropping it)."""
    for pattern, target in RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    raise UsageError(
        f"the checkpoint has a weight the export does not know, {key!r}: this nanochat cannot "
        "export it faithfully (no weight is ever dropped)"
    )


def hf_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our model's state dict renamed and cast to ``dtype`` (tensors already in it are not
    copied: each parameter has its own memory, as safetensors wants)."""
    return {
        exported_name(key): tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        for key, tensor in state.items()
    }


def hf_config_fields(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """The fields of ``NanochatFullConfig`` that describe ``config``, and the token ids.
    UsageError for a GPTConfig field this export does not know (a feature without weights of
    its own would otherwise be dropped without a word)."""
    unknown = sorted({f.name for f in dataclasses.fields(config)} - KNOWN_CONFIG)
    if unknown:
        raise UsageError(
            f"the model has settings the export does not know ({', '.join(unknown)}): this "
            "nanochat cannot export it faithfully"
        )
    layers = config.n_layer
    value_layers = [i for i in range(layers) if has_value_embed(i, layers)]
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": layers,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "intermediate_size": MLP_RATIO * config.n_embd,
        "max_position_embeddings": config.sequence_len,
        "rope_theta": float(ROTARY_BASE),
        "qk_scale": QK_SCALE,
        "final_logit_softcapping": LOGIT_SOFTCAP,
        "attention_windows": window_sizes(config),
        "value_embed_layers": value_layers if config.value_embeds else [],
        "value_embed_gate_channels": VE_GATE_CHANNELS,
        "value_embed_gate_range": VE_GATE_RANGE,
        "residual_scalars": config.residual_scalars,
        "smear": config.smear,
        "smear_channels": SMEAR_CHANNELS,
        "backout": config.backout,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.special_id("<|assistant_end|>"),
        "pad_token_id": tokenizer.special_id("<|assistant_end|>"),
        "tie_word_embeddings": False,
    }


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Where a reply ends: the engine's stop tokens (for the generation config)."""
    from nanochat.inference.engine import STOP_TOKENS

    return [tokenizer.special_id(name) for name in STOP_TOKENS]


def features(config: GPTConfig) -> list[str]:
    """The recipe's optional features this model has on, in words (for the model card)."""
    found = []
    if "S" in config.window_pattern.upper():
        found.append(f"sliding windows ({config.window_pattern}, last layer full)")
    if config.n_kv_head != config.n_head:
        found.append(f"GQA ({config.n_kv_head} kv heads)")
    for name in ("value_embeds", "residual_scalars", "smear", "backout"):
        if getattr(config, name):
            found.append(name.replace("_", " "))
    return found
