"""The Hugging Face export (nanochat/export): the folder computes what our model computes.

Parity, measured: for the tiny preset's architecture and a d4 with every optional feature
on (random weights, spread logits, random scalars and gates), the folder loaded by
transformers gives our logits within 1e-4 (fp32, CPU) on the export's prompts (one longer
than the sliding window), the same 32 greedy tokens as our engine, the same tokens for a
left-padded batch as for each prompt alone; the tokenizer gives our ids on the tokenizer test
corpus, and the chat template our rendering on the embedded chat tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.builders import ROUND_TRIP, save_checkpoint, spread_logits, tiny_gpt, tokenizer_for

from nanochat.common import StageFailed, UsageError
from nanochat.export import hf_folder, hf_weights
from nanochat.model.gpt import config_for_depth
from nanochat.tokenizer import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")  # installed by the dev extras (train)

TOLERANCE = 1e-4
# The tiny preset's model (depth 4, context 256, the recipe's defaults) and a d4 with every
# optional feature on, GQA included.
TINY = {"window_pattern": "SSSL", "value_embeds": True, "smear": True}
EVERYTHING = {
    **TINY,
    "residual_scalars": True,
    "backout": True,
    "n_kv_head": 1,
}


def chat_texts() -> list[str]:
    from nanochat.tasks import GSM8K, Identity, Mixture, SmolTalk, SpellingBee

    mix = Mixture([SmolTalk(), GSM8K(n=20), Identity(), SpellingBee(n=20)])
    return [m["content"] for c in mix for m in c["messages"] if isinstance(m["content"], str)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 400-token BPE trained on the chat tasks and the tokenizer test corpus (so it has
    multi-byte merges), saved under a module-wide BASE_DIR."""
    base = tmp_path_factory.mktemp("export-base")
    return base, tokenizer_for(chat_texts() * 2 + ROUND_TRIP * 20, 400, base)


def build(tokenizer, extras: dict, kind: str = "sft", tag: str = "d4"):
    """A random d4 with ``extras``: output projections and head spread (no near-ties), every
    scalar and gate random so each feature changes the result; saved as a checkpoint."""
    base, tok = tokenizer
    config = config_for_depth(4, tok.vocab_size, sequence_len=256, **extras)
    model = spread_logits(tiny_gpt(config, seed=1))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambda" in name or "gate" in name:
                param.copy_(torch.rand(param.shape, generator=generator) - 0.5)
    save_checkpoint(base, model, kind=kind, tag=tag)
    return model.eval()


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module", params=["tiny", "everything"])
def exported(request, tokenizer):
    """(our model, the exported folder) of each architecture."""
    extras = TINY if request.param == "tiny" else EVERYTHING
    model = build(tokenizer, extras, tag=request.param)
    base, _ = tokenizer
    result = hf_folder.export(base, "sft", request.param)
    assert result.parity["max_abs_diff"] <= TOLERANCE
    return model, result.folder


# --- the tokenizer and the chat template -----------------------------------------------------


def test_tokenizer_gives_our_ids_on_the_test_corpus(tokenizer, tmp_path):
    from nanochat.export.hf_tokenizer import fast_tokenizer
    from nanochat.tokenizer import tokenizer_dir

    base, tok = tokenizer
    fast = fast_tokenizer(tokenizer_dir(base), tok, 256)
    fast.save_pretrained(str(tmp_path))
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text in [*ROUND_TRIP, " ".join(ROUND_TRIP)]:
        ours = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours, text
        assert hf(text)["input_ids"] == [tok.bos_id, *ours]  # BOS first, as in training
        assert hf.decode(ours) == text
    for name in SPECIAL_TOKENS:  # each special token is one id, ours, never split
        assert hf(name, add_special_tokens=False)["input_ids"] == [tok.special_id(name)]
    plain = hf("<|user_end|>", add_special_tokens=False, split_special_tokens=True)
    assert plain["input_ids"] == tok.encode("<|user_end|>")  # our encode's behaviour


def test_chat_template_renders_what_we_render(tokenizer, tmp_path):
    from nanochat.export.hf_tokenizer import fast_tokenizer
    from nanochat.tasks import GSM8K, Identity, Mixture, SmolTalk, SpellingBee
    from nanochat.tokenizer import tokenizer_dir

    base, tok = tokenizer
    hf = fast_tokenizer(tokenizer_dir(base), tok, 256)
    mix = Mixture([SmolTalk(), GSM8K(n=50), Identity(), SpellingBee(n=20)])
    tool_turns = 0
    for conversation in mix:
        ids, _ = tok.render_conversation(conversation, max_tokens=10**6)
        assert hf.apply_chat_template(conversation["messages"], tokenize=True)["input_ids"] == ids
        tool_turns += any(
            isinstance(m["content"], list) and any(p["type"] == "python" for p in m["content"])
            for m in conversation["messages"]
        )
        roles = [m["role"] for m in conversation["messages"]]
        head = conversation["messages"][: roles.index("user") + 1]  # (system and) first user
        prompt = {"messages": [*head, {"role": "assistant", "content": ""}]}
        rendered = hf.apply_chat_template(head, add_generation_prompt=True, tokenize=True)
        assert rendered["input_ids"] == tok.render_for_completion(prompt)
    assert len(mix) > 100 and tool_turns >= 20  # the tool-call tokens were rendered too
    system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    ours, _ = tok.render_conversation({"messages": system})
    assert hf.apply_chat_template(system, tokenize=True)["input_ids"] == ours
    refused = {  # each is refused by render_conversation too
        "alternate": [{"role": "assistant", "content": "x"}],
        "at least one message": [],
        "followed by a user": [{"role": "system", "content": "x"}],
        "must be a string": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        "parts are text, python": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
        ],
        "unknown role": [{"role": "tool", "content": "x"}],
    }
    for says, messages in refused.items():
        with pytest.raises(Exception, match=says):
            hf.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ValueError):
            tok.render_conversation({"messages": messages})


# --- the model -------------------------------------------------------------------------------


def test_logits_match_ours(exported, tokenizer):
    from nanochat.model.gpt import short_window

    model, folder = exported
    theirs, _ = load(folder)
    _, tok = tokenizer
    prompts = hf_folder.parity_prompts(tok, short_window(model.config), 256)
    assert max(len(p) for p in prompts) > short_window(model.config)  # windows are exercised
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            batch = torch.tensor([ids])
            worst = max(worst, (model(batch) - theirs(batch).logits).abs().max().item())
    assert worst <= TOLERANCE


def greedy(engine, prompt: list[int], steps: int) -> list[int]:
    return [row[0] for row, _ in engine.generate(prompt, max_tokens=steps, temperature=0)]


def test_greedy_generation_matches_our_engine(exported, tokenizer):
    """32 tokens from a short prompt, and 32 more from one that fills the sliding window
    (64 positions here), so cached decoding past the window is compared too."""
    from nanochat.inference.engine import Engine
    from nanochat.model.gpt import short_window

    model, folder = exported
    theirs, _ = load(folder)
    _, tok = tokenizer
    engine = Engine(model, tok)
    window = short_window(model.config)
    long_prompt = tok.encode(" ".join(ROUND_TRIP) * 4, prepend="<|bos|>")[: window - 8]
    for prompt in (tok.encode("The capital of France is", prepend="<|bos|>"), long_prompt):
        ours = greedy(engine, prompt, 32)
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert len(ours) == 32
        assert out[0, len(prompt) :].tolist() == ours
    assert len(long_prompt) + 32 > window


def test_left_padded_batch_matches_our_engine_per_prompt(exported, tokenizer):
    from nanochat.inference.engine import Engine

    model, folder = exported
    theirs, hf = load(folder)
    _, tok = tokenizer
    hf.padding_side = "left"
    prompts = ["short one", "a much longer prompt, " * 12]
    ours = [greedy(Engine(model, tok), tok.encode(p, prepend="<|bos|>"), 16) for p in prompts]
    batch = hf(prompts, return_tensors="pt", padding=True)
    out = theirs.generate(**batch, max_new_tokens=16, do_sample=False)
    assert out[:, batch["input_ids"].shape[1] :].tolist() == ours


def test_generation_without_a_mask_or_with_other_stops_is_unchanged(exported, tokenizer):
    """The pad token is a stop token: transformers never guesses a mask that hides BOS."""
    _, folder = exported
    theirs, _ = load(folder)
    _, tok = tokenizer
    prompt = torch.tensor([tok.encode("The capital of France is", prepend="<|bos|>")])
    plain = theirs.generate(prompt, max_new_tokens=16, do_sample=False)
    end = tok.special_id("<|assistant_end|>")
    other = theirs.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=end)
    assert plain.tolist() == other.tolist()


def test_inputs_it_would_get_wrong_are_refused(exported):
    from transformers import StaticCache

    _, folder = exported
    theirs, _ = load(folder)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="input_ids"):
        theirs(inputs_embeds=torch.zeros(1, 3, theirs.config.hidden_size))
    with pytest.raises(ValueError, match="2-D attention_mask"):
        theirs(ids, attention_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="output_attentions"):
        theirs(ids, output_attentions=True)
    with pytest.raises(ValueError, match="DynamicCache"):
        theirs(ids, cache=StaticCache(config=theirs.config, max_cache_len=8))


def test_folder_holds_what_tools_expect(exported, tokenizer):
    model, folder = exported
    _, tok = tokenizer
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "modeling_nanochat_full.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nanochat_full" and config["auto_map"] == hf_weights.AUTO_MAP
    assert config["nanochat_export"]["kind"] == "sft"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.special_id("<|assistant_end|>"), tok.bos_id]
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "max |logit difference|" in card
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len(model.state_dict())  # every weight, none dropped
    # Without trust_remote_code transformers refuses: it never falls back to its own class.
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)


# --- refusals, atomicity, shards, dtypes -------------------------------------------------------


def test_a_weight_or_setting_the_export_does_not_know_is_refused(tokenizer, monkeypatch):
    assert hf_weights.exported_name("blocks.3.attn.c_q.weight") == (
        "model.layers.3.self_attn.q_proj.weight"
    )
    with pytest.raises(UsageError, match="blocks.0.attn.new_feature.weight"):
        hf_weights.hf_state({"blocks.0.attn.new_feature.weight": torch.zeros(2)}, torch.float32)
    _, tok = tokenizer
    config = config_for_depth(2, tok.vocab_size)
    monkeypatch.setattr(hf_weights, "KNOWN_CONFIG", hf_weights.KNOWN_CONFIG - {"smear"})
    with pytest.raises(UsageError, match="settings the export does not know \\(smear\\)"):
        hf_weights.hf_config_fields(config, tok)


def test_dest_with_other_files_is_refused_and_untouched(tokenizer, tmp_path):
    base, _ = tokenizer
    build(tokenizer, TINY, tag="dest")
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a nanochat export"):
        hf_folder.export(base, "sft", "dest", dest=dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        hf_folder.export(base, "sft", "dest", dest=tmp_path / "file")
    with pytest.raises(UsageError, match="cannot be made"):
        hf_folder.export(base, "sft", "dest", dest=tmp_path / "file" / "inside")
    (tmp_path / "link").symlink_to(dest)
    with pytest.raises(UsageError, match="symbolic link"):
        hf_folder.export(base, "sft", "dest", dest=tmp_path / "link")
    # An export with something added to it (a git clone of the Hub repo, notes) is not ours.
    export = hf_folder.export(base, "sft", "dest", dest=tmp_path / "export").folder
    (export / ".git").mkdir()
    with pytest.raises(UsageError, match="not a nanochat export"):
        hf_folder.export(base, "sft", "dest", dest=export)
    assert (export / ".git").is_dir() and (export / "model.safetensors").is_file()


def test_a_failed_check_keeps_nothing_and_a_rerun_replaces(tokenizer, tmp_path, monkeypatch):
    base, _ = tokenizer
    build(tokenizer, TINY, tag="check")
    dest = tmp_path / "out"
    hf_folder.export(base, "sft", "check", dest=dest)
    before = (dest / "model.safetensors").read_bytes()
    monkeypatch.setattr(hf_folder, "TOLERANCE", -1.0)  # no folder can pass, whatever its dtype
    for dtype in ("float32", "bfloat16"):
        with pytest.raises(StageFailed, match="not kept"):
            hf_folder.export(base, "sft", "check", dest=dest, dtype=dtype)
    assert (dest / "model.safetensors").read_bytes() == before  # the old export stands
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")  # the export lock
    assert beside == ["out"]  # no temp folder left
    monkeypatch.setattr(hf_folder, "TOLERANCE", 1e-4)
    # What a killed export leaves (its work folder, the old export moved aside) goes on rerun.
    (tmp_path / ".out.export-killed").mkdir()
    (tmp_path / ".out.old-killed").mkdir()
    (tmp_path / ".out.old-killed" / "model.safetensors").write_bytes(b"old")
    hf_folder.export(base, "sft", "check", dest=dest)  # replaces the old export whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["out"]


def test_large_weights_are_sharded_with_an_index(tokenizer, tmp_path, monkeypatch):
    base, _ = tokenizer
    model = build(tokenizer, EVERYTHING, tag="shards")
    monkeypatch.setattr(hf_folder, "MAX_SHARD", "1MB")
    result = hf_folder.export(base, "sft", "shards", dest=tmp_path / "sharded")
    shards = sorted(p.name for p in result.folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (result.folder / "model.safetensors.index.json").is_file()
    theirs, _ = load(result.folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() <= TOLERANCE


def test_bfloat16_export_halves_the_size_and_keeps_close(tokenizer, tmp_path):
    base, _ = tokenizer
    build(tokenizer, EVERYTHING, tag="bf16")
    full = hf_folder.export(base, "sft", "bf16", dest=tmp_path / "f32")
    half = hf_folder.export(base, "sft", "bf16", dest=tmp_path / "b16", dtype="bfloat16")
    size = lambda r: (r.folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.55 * size(full)
    assert json.loads((half.folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert half.parity["max_abs_diff"] <= TOLERANCE  # against our model in the same rounding


def test_an_outside_attention_kernel_is_refused(exported):
    """vLLM's transformers backend (and attn_implementation=...) swap the attention for their
    own, which would drop smear's decoding state and the per-layer windows: one line."""
    _, folder = exported
    theirs, _ = load(folder)
    theirs.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="smear"):
        theirs(torch.tensor([[1, 2, 3]]))
