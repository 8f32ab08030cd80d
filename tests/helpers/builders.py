"""Tiny artifacts the tests build again and again: made-up texts, BPE tokenizers trained on
them, small random GPTs (optionally with a wide logit spread) and checkpoints saved the way
the training stages save them. CPU only, seconds at most."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from nanochat.model.gpt import GPT, GPTConfig, build_model
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir, train_tokenizer
from nanochat.training import checkpoint

# The tokenizer test corpus: whitespace runs, accents, CJK, emoji (ZWJ sequences and flags),
# combining marks, control bytes; every tokenizer must encode and decode these alike.
ROUND_TRIP = [
    "",
    "hello world",
    "   leading and trailing   ",
    "tabs\tand\nnew\n\n\nlines\r\n",
    " " * 17,
    "Crème brûlée, naïve café",
    "東京は日本の首都です。漢字とかな",
    "emoji 🍕🎉👩‍👩‍👧 flags 🇫🇷",
    "combining: e\u0301 a\u0308\u0323 Z\u0335\u0321",
    "mixed: Привет 123 世界 ∑∫√ \x00\x7f",
]


def word_texts(
    words: list[str], count: int, shortest: int, spread: int, stride: int = 1
) -> list[str]:
    """``count`` texts cycling through ``words``: text i starts at word ``i * stride`` and
    is ``shortest + i % spread`` words long."""
    n = len(words)
    return [
        " ".join(words[(i * stride + j) % n] for j in range(shortest + i % spread))
        for i in range(count)
    ]


def tokenizer_for(
    texts: Iterable[str], vocab_size: int = 300, base: Path | None = None
) -> Tokenizer:
    """A BPE tokenizer trained on ``texts``; saved where the stages look for it under the
    artifacts root ``base``, when given."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    if base is not None:
        tokenizer.save(tokenizer_dir(base))
    return tokenizer


def chat_tokenizer(base: Path | None = None) -> Tokenizer:
    """A 300-token tokenizer trained on the embedded chat tasks' messages (twice over)."""
    from nanochat.tasks import GSM8K, Identity, Mixture, SmolTalk, SpellingBee

    mix = Mixture([SmolTalk(), GSM8K(n=20), Identity(), SpellingBee(n=20)])
    texts = [m["content"] for c in mix for m in c["messages"] if isinstance(m["content"], str)]
    return tokenizer_for(texts * 2, 300, base)


def tiny_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A freshly initialised GPT of shape ``config`` on the CPU, seeded."""
    torch.manual_seed(seed)
    return build_model(config, "cpu")


def spread_logits(model: GPT) -> GPT:
    """Give ``model`` random output projections (zero at init: every block would be an
    identity) and a head with logits spread ~4 (no near-ties for argmax), its special-token
    rows zeroed: greedy decoding then never stops or calls the tool by accident."""
    first_special = model.config.vocab_size - len(SPECIAL_TOKENS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight"):
                param.normal_(0.0, 0.5 / math.sqrt(param.size(1)))
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[first_special:] = 0.0
    return model


def save_checkpoint(
    base: Path,
    model: GPT,
    kind: str = "base",
    tag: str = "d2",
    step: int = 1,
    run_config: dict | None = None,
    prefix: str = "",
) -> Path:
    """Save ``model`` as stage ``kind`` saves it under ``base`` (meta: its model_config, and
    ``run_config`` when given); ``prefix`` goes before every state key (``_orig_mod.`` is
    what torch.compile leaves). Returns the checkpoint folder."""
    meta: dict = {"model_config": dataclasses.asdict(model.config)}
    if run_config is not None:
        meta["run_config"] = run_config
    state = {prefix + key: value for key, value in model.state_dict().items()}
    directory = checkpoint.checkpoint_dir(base, kind, tag)
    checkpoint.save(directory, step, state, rank_state={}, meta=meta)
    return directory


def synthetic_corpus() -> tuple[list[str], list[str]]:
    """(train, validation) texts of random sentences with a few fixed phrases in them."""
    rng = random.Random(0)
    words = "the values is returned when object file name this used to data from".split()
    phrases = ["a list of", "can be used", "the name of"]

    def sentence() -> str:
        body = [rng.choice(words) for _ in range(rng.randint(6, 12))]
        body.insert(rng.randint(1, len(body)), rng.choice(phrases))
        text = " ".join(body)
        return text[0].upper() + text[1:] + "."

    def doc() -> str:
        return " ".join(sentence() for _ in range(40))

    return [doc() for _ in range(20)], [doc() for _ in range(3)]
