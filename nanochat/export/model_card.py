"""The exported folder's ``README.md``: what the model is, how to load it, how it scored.

Where it fits: ``nanochat.export.hf_folder`` writes it last, from the checkpoint's meta, the
report sections under ``BASE_DIR/report/`` (the report card's summary table, the same
``nanochat.report.summary_table``) and the parity the export measured. The Hugging Face Hub
shows it as the model's page (the YAML header sets the library and the pipeline).
"""

from __future__ import annotations

from pathlib import Path

from nanochat.export.hf_weights import features
from nanochat.model.gpt import GPTConfig
from nanochat.report import load_records, summary_table

# The report sections whose facts describe how the model was made, in pipeline order.
TRAINING_SECTIONS = ("tokenizer", "pretrain", "midtrain", "sft", "rl")
STAGE_WORDS = {
    "base": "base model (pretrained only: it continues text, it does not chat)",
    "mid": "chat model after midtraining (conversation tokens, tool use)",
    "sft": "chat model after supervised fine-tuning",
    "rl": "chat model after SFT and reinforcement learning on GSM8K",
}
SHOWN_RUN_CONFIG = ("depth", "seq_len", "total_batch", "num_steps", "ratio", "dataset", "tasks")


def _facts(record: dict) -> list[str]:
    return [f"  - {key}: {value}" for key, value in (record.get("facts") or {}).items()]


def model_card(
    name: str,
    config: GPTConfig,
    checkpoint: dict,
    report_dir: Path,
    parity: dict,
) -> str:
    """The card's text. ``checkpoint``: kind, tag, step, run_config, val_bpb (what the meta
    holds); ``parity``: the export's own check (max logit difference, prompts, dtype)."""
    records = load_records(report_dir)
    run_config = checkpoint.get("run_config") or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [nanochat, custom_code]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {config.n_layer}-layer {STAGE_WORDS.get(checkpoint.get('kind'), 'model')}, "
        "trained from raw text with nanochat and exported with `make export`.",
        "",
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'chat = [{"role": "user", "content": "Why is the sky blue?"}]',
        'ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")',
        "out = model.generate(**ids, max_new_tokens=128, do_sample=False)",
        'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "PATH is this folder, or the Hub repository it was pushed to.",
        "`trust_remote_code=True` loads `modeling_nanochat_full.py` from this folder (the "
        "tokenizer needs it too: transformers reads the model's config first); "
        "transformers' own `nanochat` class lacks this model's features (the 1.2 QK scale, "
        "value embeddings, smear, sliding windows, ...), so it would compute something else.",
        "The chat template renders exactly what nanochat trains on, the python tool's tokens "
        "included; replies end at `<|assistant_end|>`.",
        "",
        "## Model",
        "",
        f"- layers {config.n_layer}, width {config.n_embd}, heads {config.n_head} "
        f"(kv heads {config.n_kv_head}), head dim {config.head_dim}",
        f"- vocabulary {config.vocab_size} (byte-level BPE), context {config.sequence_len}",
        f"- features: {', '.join(features(config)) or 'none (the plain recipe)'}",
        f"- checkpoint: {checkpoint.get('kind')} / {checkpoint.get('tag')} / step "
        f"{checkpoint.get('step')}"
        + (
            f", validation bits per byte {checkpoint['val_bpb']:.4f}"
            if isinstance(checkpoint.get("val_bpb"), float)
            else ""
        ),
    ]
    shown = {k: run_config[k] for k in SHOWN_RUN_CONFIG if k in run_config}
    if shown:
        lines.append("- run: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    lines += [
        f"- export check: max |logit difference| {parity['max_abs_diff']:.2e} against "
        f"nanochat on {parity['prompts']} prompts ({parity['dtype']}, CPU)",
        "",
        "## Report card",
        "",
        summary_table(records) if records else "No report sections were found.",
        "",
    ]
    made = [stage for stage in TRAINING_SECTIONS if records.get(stage)]
    if made:
        lines += ["## Training facts", ""]
        for stage in made:
            lines += [f"- {records[stage].get('title') or stage}", *_facts(records[stage])]
        lines.append("")
    return "\n".join(lines)
