"""The GPT decoder (nanochat/model/gpt.py): shapes, counts, init, causality, windows, KV cache.

Models here are tiny (2-3 layers, width 64, vocab 256-512, context 32) so the whole file
runs in seconds on 2 CPU cores. Tests that need a model whose output depends on its
attention re-initialize the zero output projections with random values first.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.model import attention, gpt
from nanochat.model.gpt import (
    GPT,
    GPTConfig,
    KVCache,
    build_model,
    config_for_depth,
    flops_per_token,
    num_params,
    param_groups,
    rotary_tables,
    scaling_params,
    scaling_params_of,
    window_sizes,
)

SEQ = 32
VOCAB = 256


def small_config(**changes) -> GPTConfig:
    """Width 64, 4 heads of 16, 2 layers: small enough to run everything exactly in fp32."""
    fields = dict(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, sequence_len=SEQ)
    fields.update(changes)
    return GPTConfig(**fields)


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A built model whose zero-initialized matrices and gates are made random (non-trivial)."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("c_proj.weight", "ve_gate.weight")):
                param.normal_(0.0, 0.5 / math.sqrt(param.size(1)))
            elif name.endswith(("_lambdas", "_lambda")):
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=generator)


# ---- configuration and the depth dial ----


@pytest.mark.parametrize(
    "depth, width, heads",
    [(4, 256, 2), (12, 768, 6), (20, 1280, 10), (24, 1536, 12), (26, 1664, 13)],
)
def test_depth_dial(depth, width, heads):
    config = config_for_depth(depth, vocab_size=32768)
    assert (config.n_layer, config.n_embd, config.n_head) == (depth, width, heads)
    assert config.head_dim == 128
    assert config.n_kv_head == heads  # plain multi-head attention by default
    assert config.sequence_len == 2048


def test_depth_dial_rounds_width_up():
    assert config_for_depth(1, 512).n_embd == 128  # 64 -> 128
    assert config_for_depth(3, 512).n_embd == 256  # 192 -> 256
    assert config_for_depth(5, 512, n_kv_head=1).n_kv_head == 1  # MQA


def test_invalid_gqa_raises():
    with pytest.raises(ValueError, match=r"n_head \(6\) must be divisible by n_kv_head \(4\)"):
        config_for_depth(12, vocab_size=512, n_kv_head=4)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        small_config(n_head=4, n_kv_head=3)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_embd=60, n_head=8), "divisible by n_head"),
        (dict(window_pattern="SXL"), "window_pattern"),
        (dict(window_pattern=""), "window_pattern"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
    ],
)
def test_invalid_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(**changes)


def test_config_round_trips_through_a_dict():
    # checkpoints store dataclasses.asdict(config) and rebuild with GPTConfig(**meta)
    config = config_for_depth(4, 512, sequence_len=64, window_pattern="SL", value_embeds=True)
    assert GPTConfig(**dataclasses.asdict(config)) == config


def test_window_sizes_tile_the_pattern_and_end_full():
    config = small_config(n_layer=6, window_pattern="SSSL")
    w = SEQ // 4
    assert window_sizes(config) == [w, w, w, None, w, None]
    assert window_sizes(small_config(n_layer=3, window_pattern="L")) == [None] * 3
    assert window_sizes(small_config(n_layer=1, window_pattern="S")) == [None]


# ---- parameter counts and FLOPs ----


def closed_form_params(c: GPTConfig) -> dict[str, int]:
    """The parameter count written out from the config, independently of the module."""
    C, V, L = c.n_embd, c.vocab_size, c.n_layer
    kv = c.n_kv_head * (C // c.n_head)
    per_layer = C * C + 2 * C * kv + C * C + 8 * C * C  # q, k and v, out, MLP in and out
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2] if c.value_embeds else []
    gates = len(ve_layers) * min(12, C) * c.n_kv_head
    return {
        "matrices": L * per_layer + gates,
        "embedding": V * C,
        "value_embeds": len(ve_layers) * V * kv,
        "head": V * C,
        "resid_scalars": L if c.residual_scalars else 0,
        "scalars": L if c.residual_scalars else 0,
        "gates": (min(24, C) + 1 if c.smear else 0) + (1 if c.backout else 0),
    }


@pytest.mark.parametrize(
    "config",
    [
        small_config(),
        small_config(n_layer=3, n_kv_head=2),
        small_config(n_layer=3, n_kv_head=1, residual_scalars=True, value_embeds=True),
        small_config(n_layer=4, residual_scalars=True, value_embeds=True, window_pattern="SL"),
        small_config(n_layer=3, value_embeds=True, smear=True, backout=True),
    ],
    ids=["mha", "gqa", "mqa-extras", "mha-extras-window", "every-feature"],
)
def test_parameter_counts_match_closed_form(config):
    model = build_model(config, "cpu")
    expected = closed_form_params(config)
    assert num_params(model) == sum(expected.values())
    plain = closed_form_params(dataclasses.replace(config, value_embeds=False))
    # the value-embedding gates do not move the data budget
    assert scaling_params(model) == plain["matrices"] + expected["head"]
    assert scaling_params_of(config) == scaling_params(model)
    groups = param_groups(model)
    assert {k: sum(p.numel() for p in v) for k, v in groups.items()} == expected
    # every parameter lands in exactly one group
    grouped = [id(p) for ps in groups.values() for p in ps]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in groups["matrices"])  # what Muon needs


def test_flops_per_token_d20_by_hand():
    config = config_for_depth(20, vocab_size=65536, sequence_len=2048)
    C, L, V, H, D, T = 1280, 20, 65536, 10, 128, 2048
    matmul_params = L * 12 * C * C + V * C  # per layer q, k, v, out (4 C^2) + MLP (8 C^2); head
    expected = 6 * matmul_params + L * 12 * H * D * T
    assert expected == 3_491_758_080
    assert flops_per_token(config) == expected


@pytest.mark.parametrize("depth", [4, 12, 20, 24])
def test_the_launchers_flops_count_is_the_models(depth):
    """nanochat.model.dial prices runs without torch; it must count what the model counts."""
    from nanochat.model import dial

    config = config_for_depth(depth, vocab_size=32768, sequence_len=2048)
    assert dial.flops_per_token(depth, 32768, 2048) == flops_per_token(config)


def test_flops_per_token_short_windows_see_less_context():
    full = small_config(n_layer=4)
    windowed = small_config(n_layer=4, window_pattern="SSSL")
    saved = 3 * 12 * full.n_head * full.head_dim * (SEQ - SEQ // 4)
    assert flops_per_token(full) - flops_per_token(windowed) == saved


def test_groups_feed_the_optimizer():
    from nanochat.training import optim

    model = build_model(small_config(residual_scalars=True), "cpu")
    optimizer = optim.build_optimizer(param_groups(model), model.config.n_embd, 2**19)
    names = {group["name"] for group in optimizer.param_groups}
    assert names == {"matrices", "embedding", "head", "resid_scalars", "scalars"}
    model = build_model(small_config(value_embeds=True, smear=True, backout=True), "cpu")
    optimizer = optim.build_optimizer(param_groups(model), model.config.n_embd, 2**19)
    names = {group["name"] for group in optimizer.param_groups}
    assert names == {"matrices", "embedding", "value_embeds", "head", "gates"}


# ---- construction and init ----


def test_build_model_initializes_as_designed():
    config = config_for_depth(4, vocab_size=512, sequence_len=64)  # the tiny preset's shape
    model = build_model(config, "cpu")
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params.values())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(gpt.EMBEDDING_STD, rel=0.05)
    bound = math.sqrt(3 / config.n_embd)
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            assert linear.weight.abs().max().item() <= bound
            assert linear.weight.std().item() == pytest.approx(config.n_embd**-0.5, rel=0.05)
    assert not any(name in model.state_dict() for name in ("cos", "sin"))  # not checkpointed


def test_rotary_tables_recomputed_after_meta_build():
    config = small_config()
    model = build_model(config, "cpu")
    cos, sin = rotary_tables(SEQ * gpt.ROTARY_LENGTH_FACTOR, config.head_dim)
    assert model.cos.shape == (SEQ * gpt.ROTARY_LENGTH_FACTOR, config.head_dim // 2)
    assert model.cos.dtype == model.sin.dtype == torch.float32
    assert torch.isfinite(model.cos).all() and torch.isfinite(model.sin).all()
    assert torch.equal(model.cos, cos) and torch.equal(model.sin, sin)
    # position 0 is unrotated; position 1, channel pair i turns by base^(-2i/D)
    assert torch.equal(cos[0], torch.ones(config.head_dim // 2))
    assert torch.equal(sin[0], torch.zeros(config.head_dim // 2))
    angle = attention.ROTARY_BASE ** (-2 / config.head_dim)
    assert cos[1, 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_residual_scalars_init_and_neutral_setting():
    plain = random_model(small_config())
    mixed_config = small_config(residual_scalars=True)
    mixed = build_model(mixed_config, "cpu")
    # upstream's init over 2 layers: resid 1.15 then 1.05, x0 0.20 then 0.05
    torch.testing.assert_close(mixed.resid_lambdas, torch.tensor([1.15, 1.05]))
    torch.testing.assert_close(mixed.x0_lambdas, torch.tensor([0.20, 0.05]))
    # resid 1 and x0 0 is exactly the plain model
    missing = mixed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["resid_lambdas", "x0_lambdas"]
    with torch.no_grad():
        mixed.resid_lambdas.fill_(1.0)
        mixed.x0_lambdas.zero_()
    idx = tokens(2, SEQ)
    torch.testing.assert_close(mixed(idx), plain(idx), rtol=0, atol=0)
    with torch.no_grad():
        mixed.x0_lambdas.fill_(0.5)
    assert not torch.allclose(mixed(idx), plain(idx))


# ---- forward, loss ----


def test_shapes_and_initial_loss_near_uniform():
    model = build_model(small_config(vocab_size=512), "cpu")
    idx = torch.randint(0, 512, (3, SEQ))
    logits = model(idx)
    assert logits.shape == (3, SEQ, 512) and logits.dtype == torch.float32
    assert logits.abs().max().item() < 0.1  # zero projections: only the small head speaks
    loss = model(idx, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(512), abs=0.01)


def test_per_token_loss_and_ignore_index():
    model = random_model(small_config())
    idx, targets = tokens(2, SEQ), tokens(2, SEQ, seed=2)
    targets[0, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, SEQ)
    assert torch.equal(per_token[0, :5], torch.zeros(5))
    manual = F.cross_entropy(model(idx)[1], targets[1], reduction="none")
    torch.testing.assert_close(per_token[1], manual)
    mean = model(idx, targets)
    torch.testing.assert_close(mean, per_token.sum() / (targets != -1).sum())
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="sum")


def test_logits_are_soft_capped():
    model = random_model(small_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    logits = model(tokens(1, SEQ))
    assert logits.abs().max().item() <= gpt.LOGIT_SOFTCAP
    assert logits.abs().max().item() > 0.9 * gpt.LOGIT_SOFTCAP


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model(small_config(residual_scalars=True, value_embeds=True), "cpu")
    idx = tokens(4, SEQ)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used
    assert model(idx[:, :-1], idx[:, 1:]).item() < first - 0.1


# ---- smear and backout ----


def test_smear_mixes_the_previous_embedding_hand_computed():
    config = small_config(n_layer=1, smear=True)
    model = build_model(config, "cpu")
    x = torch.randn(1, 3, config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
        model.smear_gate.weight.zero_()  # sigmoid(0) = 1/2: each gate is 0.5 * 0.5
    out = model.smear(x, None)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 has no predecessor
    torch.testing.assert_close(out[:, 1], x[:, 1] + 0.25 * x[:, 0])
    torch.testing.assert_close(out[:, 2], x[:, 2] + 0.25 * x[:, 1])
    fresh = build_model(config, "cpu")  # lambda 0 at init: the smear starts as a no-op
    torch.testing.assert_close(fresh.smear(x, None), x, rtol=0, atol=0)


def test_backout_subtracts_the_middle_residual():
    config = small_config(n_layer=3, backout=True)
    model = random_model(config)
    assert model.backout_lambda.item() != 0
    plain = build_model(dataclasses.replace(config, backout=False), "cpu").eval()
    unexpected = plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert unexpected == ["backout_lambda"]
    idx = tokens(2, SEQ)
    middle = {}
    plain.blocks[1].register_forward_hook(lambda _m, _i, out: middle.setdefault("x", out))
    final = {}
    plain.blocks[2].register_forward_hook(lambda _m, _i, out: final.setdefault("x", out))
    plain(idx)  # the same weights, without the backout
    expected = gpt.norm(final["x"] - model.backout_lambda * middle["x"])
    logits = plain.lm_head(expected).float()
    expected_logits = gpt.LOGIT_SOFTCAP * torch.tanh(logits / gpt.LOGIT_SOFTCAP)
    torch.testing.assert_close(model(idx), expected_logits, rtol=0, atol=1e-5)
    assert build_model(config, "cpu").backout_lambda.item() == pytest.approx(gpt.BACKOUT_INIT)


# ---- causality and windows ----


@pytest.mark.parametrize("config", [small_config(), small_config(n_kv_head=1, value_embeds=True)])
def test_causality(config):
    model = random_model(config)
    idx = tokens(2, SEQ)
    t = 13
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min().item() > 1e-4


def test_sliding_window_limits_what_a_short_layer_sees():
    # "SL": layer 0 sees the last w positions, layer 1 everything. Silence layer 1's
    # attention so that only layer 0 mixes positions: the logits at t then depend on the
    # tokens at t-w+1 .. t and on nothing earlier.
    config = small_config(window_pattern="SL")
    w = SEQ // 4
    assert window_sizes(config) == [w, None]
    model = random_model(config)
    with torch.no_grad():
        model.blocks[1].attn.c_proj.weight.zero_()
    idx = tokens(1, SEQ)
    t = 20
    base = model(idx)[0, t]

    def logits_with_changed(position: int) -> torch.Tensor:
        changed = idx.clone()
        changed[0, position] = (changed[0, position] + 1) % VOCAB
        return model(changed)[0, t]

    for outside in (0, t - w - 3, t - w):
        torch.testing.assert_close(logits_with_changed(outside), base, rtol=0, atol=1e-6)
    for inside in (t - w + 1, t - 1):
        assert (logits_with_changed(inside) - base).abs().max().item() > 1e-4


def test_attention_mask_semantics():
    assert gpt.attention_mask(0, 5, None) is None  # plain causal: SDPA's is_causal
    assert gpt.attention_mask(0, 5, 8) is None  # the window cuts nothing
    mask = gpt.attention_mask(3, 2, 2)  # queries at 3 and 4 over keys 0..4, window 2
    assert mask.tolist() == [
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]
    assert gpt.attention_mask(4, 1, None).all()  # decoding: one query sees the whole cache


# ---- KV cache ----

CACHE_CONFIGS = [
    small_config(),
    small_config(n_layer=3, n_kv_head=2),
    small_config(
        n_layer=3, n_kv_head=1, window_pattern="SL", residual_scalars=True, value_embeds=True
    ),
    small_config(n_layer=3, smear=True, backout=True),
]
CACHE_IDS = ["mha", "gqa", "mqa-window-extras", "smear-backout"]


@pytest.mark.parametrize("config", CACHE_CONFIGS, ids=CACHE_IDS)
def test_kv_cache_prefill_expand_decode_matches_full_forward(config):
    model = random_model(config)
    prompt = tokens(1, 11)
    continuations = tokens(3, 14, seed=5)  # different tokens per row, past the short window
    cache = KVCache.for_config(config, batch_size=1, max_len=11)
    with torch.no_grad():
        prefill = model(prompt, kv_cache=cache)
        assert cache.pos == 11
        torch.testing.assert_close(prefill, model(prompt), rtol=0, atol=1e-5)

        rows = cache.expand(3, max_len=25)
        assert (rows.batch_size, rows.max_len, rows.pos) == (3, 25, 11)
        sequences = prompt.expand(3, -1)
        for step in range(continuations.size(1)):
            new = continuations[:, step : step + 1]
            sequences = torch.cat((sequences, new), dim=1)
            decoded = model(new, kv_cache=rows)[:, -1]
            full = model(sequences)[:, -1]
            torch.testing.assert_close(decoded, full, rtol=0, atol=1e-5)
        assert rows.pos == 25
        assert cache.pos == 11  # the prompt's cache is untouched, ready for another expand


@pytest.mark.parametrize("config", CACHE_CONFIGS, ids=CACHE_IDS)
def test_kv_cache_chunked_prefill_matches_full_forward(config):
    model = random_model(config)
    idx = tokens(2, 24)
    cache = KVCache.for_config(config, batch_size=2, max_len=24)
    with torch.no_grad():
        chunks = [model(chunk, kv_cache=cache) for chunk in idx.split([9, 1, 14], dim=1)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), rtol=0, atol=1e-5)
        cache.reset()
        assert cache.pos == 0
        again = model(idx[:, :5], kv_cache=cache)
        torch.testing.assert_close(again, model(idx[:, :5]), rtol=0, atol=1e-5)


def test_kv_cache_errors_are_clear():
    config = small_config()
    model = random_model(config)
    cache = KVCache.for_config(config, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(tokens(1, 5), kv_cache=cache)
    cache.reset()
    with pytest.raises(ValueError, match="expand the cache"):
        model(tokens(2, 3), kv_cache=cache)
    with pytest.raises(ValueError, match="can not expand"):
        KVCache.for_config(config, batch_size=2, max_len=4).expand(3)
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(1, SEQ * gpt.ROTARY_LENGTH_FACTOR + 1))


# ---- the optional FlashAttention-3 path ----


def fake_flash_attn_func(q, k, v, causal, window_size):
    """FlashAttention's contract on (B, T, H, D): window (left, right) keys around each query."""
    assert causal and window_size[1] == 0
    T = q.size(1)
    pos = torch.arange(T)
    keep = pos[None, :] <= pos[:, None]
    if window_size[0] >= 0:
        keep &= pos[None, :] >= pos[:, None] - window_size[0]
    group = q.size(2) // k.size(2)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return out.transpose(1, 2), None  # like the FA3 versions that also return the LSE


def test_flash_attention_path_matches_sdpa(monkeypatch):
    config = small_config(n_layer=3, n_kv_head=2, window_pattern="SL")
    model = random_model(config)
    idx = tokens(2, SEQ)
    reference = model(idx)
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash_attn_func)
    monkeypatch.setattr(attention, "flash_usable", lambda q: True)
    torch.testing.assert_close(model(idx), reference, rtol=0, atol=1e-5)
