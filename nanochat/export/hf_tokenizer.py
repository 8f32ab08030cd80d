"""Our tokenizer as a Hugging Face fast tokenizer (``tokenizer.json``) with a chat template.

Where it fits: ``nanochat.export.hf_folder`` writes these files into an exported model
folder, beside the weights. The BPE ranks go through transformers' own tiktoken converter
(``TikTokenConverter``: vocabulary and merges rebuilt from ``merges.tiktoken``, the same
split pattern, byte-level), the nine special tokens are added as special tokens (never
split into pieces) with the ids our tokenizer gives them, and the post-processor puts
``<|bos|>`` before every text, as every document and conversation starts in training.

One difference stays, as with every Hugging Face tokenizer: text that spells a special token
(``"<|user_end|>"`` inside a message) becomes that token, where our ``encode`` keeps it plain
text; ``tokenizer(text, split_special_tokens=True)`` gives ours.

``CHAT_TEMPLATE`` renders what ``Tokenizer.render_conversation`` renders: BOS, user turns
between ``<|user_start|>``/``<|user_end|>`` (a leading system message merged into the first
user message after a blank line), assistant turns between ``<|assistant_start|>`` and
``<|assistant_end|>`` with ``python`` and ``python_output`` parts inside the tool tokens, and
``<|assistant_start|>`` as the generation prompt. The parity tests hold the two equal on the
embedded chat tasks.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.tokenizer import MERGES_FILE, SPECIAL_TOKENS, Tokenizer

BOS = "<|bos|>"
EOS = "<|assistant_end|>"  # where a reply ends: generation stops here (and at BOS)

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=none, turn=0) -%}"
    "{%- if messages | length == 0 -%}"
    "{{- raise_exception('a conversation has at least one message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] | string) -}}"
    "{%- endif -%}"
    "{%- if message['role'] != 'assistant' and message['content'] is not string -%}"
    "{{- raise_exception(message['role'] + ' content must be a string') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{%- set ns.system = message['content'] -%}"
    "{%- else -%}"
    "{%- set expected = 'user' if ns.turn % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user') -}}"
    "{%- endif -%}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if ns.system is not none -%}"
    "{{- ns.system + '\n\n' -}}"
    "{%- set ns.system = none -%}"
    "{%- endif -%}"
    "{{- message['content'] -}}"
    "{{- '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is sequence and message['content'] is not mapping -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part is not mapping or part['type'] not in ['text', 'python', 'python_output'] -%}"
    "{{- raise_exception('assistant parts are text, python or python_output') -}}"
    "{%- endif -%}"
    "{%- if part['text'] is not string -%}"
    "{{- raise_exception('a ' + part['type'] + ' part needs a string text') -}}"
    "{%- endif -%}"
    "{%- if part['type'] == 'python' -%}"
    "{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{- raise_exception('assistant content must be a string or a list of parts') -}}"
    "{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system is not none -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)


def fast_tokenizer(tokenizer_folder: Path, tokenizer: Tokenizer, max_length: int):
    """A ``PreTrainedTokenizerFast`` equal to ``tokenizer`` (loaded from ``tokenizer_folder``),
    BOS first, the chat template set, ``max_length`` its context."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(
        vocab_file=str(Path(tokenizer_folder) / MERGES_FILE),
        pattern=tokenizer.pattern,
        extra_special_tokens=list(SPECIAL_TOKENS),
    ).converted()
    for name in SPECIAL_TOKENS:
        if converted.token_to_id(name) != tokenizer.special_id(name):
            raise ValueError(
                f"the converted tokenizer gives {name} the id {converted.token_to_id(name)}, "
                f"ours {tokenizer.special_id(name)}"
            )
    if converted.get_vocab_size() != tokenizer.vocab_size:
        raise ValueError(
            f"the converted vocabulary has {converted.get_vocab_size()} tokens, "
            f"ours {tokenizer.vocab_size}"
        )
    converted.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, tokenizer.bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # a stop token: see hf_folder.write_config
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS)],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def write_tokenizer(folder: Path, tokenizer_folder: Path, tokenizer: Tokenizer, max_length: int):
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (chat template inside) and
    ``special_tokens_map.json`` into ``folder``."""
    fast = fast_tokenizer(tokenizer_folder, tokenizer, max_length)
    fast.save_pretrained(str(folder), save_jinja_files=False)
