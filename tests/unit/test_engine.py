"""The inference engine (nanochat/inference/engine.py): KV-cache decoding equals full recompute,
sampling is seeded, rows stop, the calculator tool is force-fed, the calculator refuses anything but
arithmetic, and streaming never splits a UTF-8 character.

The KV-cache tests use a real 2-layer GPT with random (non-zero) output projections and a
head with a wide logit spread, its special-token rows zeroed so greedy decoding never stops
or calls the tool by accident. The tool, stop and streaming tests drive the engine's state
machine with ``ScriptedModel``, a stand-in that always predicts the next token of a script.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers.builders import spread_logits, tiny_gpt, tokenizer_for, word_texts

from nanochat.inference.engine import Engine, use_calculator
from nanochat.model.gpt import GPTConfig

WORDS = "the cat sat on a mat and ate 12 fish while 3 dogs ran by the old red barn".split()


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(word_texts(WORDS, 200, shortest=4, spread=9), 320)


def spread_gpt(vocab_size: int) -> torch.nn.Module:
    """The 2-layer GPT of the KV-cache tests (helpers.builders.spread_logits), seeded 0."""
    config = GPTConfig(
        vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, sequence_len=128
    )
    return spread_logits(tiny_gpt(config)).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return spread_gpt(tokenizer.vocab_size)


def prompt_for(tokenizer, text: str = "the cat sat on the mat") -> list[int]:
    conversation = {
        "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    }
    return tokenizer.render_for_completion(conversation)


@torch.no_grad()
def greedy_by_recompute(model, prompt: list[int], n: int, stop=frozenset()) -> list[int]:
    """The reference: re-run the whole sequence through the model for every new token."""
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token in stop:
            break
    return out


# --- KV cache and sampling on a real GPT ---------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 3])
def test_kv_cache_greedy_equals_full_recompute(model, tokenizer, num_samples):
    prompt = prompt_for(tokenizer)
    expected = greedy_by_recompute(model, prompt, 30)
    assert len(set(expected)) > 3  # a non-trivial sequence
    steps = list(Engine(model, tokenizer).generate(prompt, num_samples, 30, temperature=0.0))
    assert len(steps) == 30
    for row in range(num_samples):
        assert [tokens[row] for tokens, _ in steps] == expected
    assert all(masks == [1] * num_samples for _, masks in steps)


def test_seeded_sampling_is_reproducible_and_seeds_differ(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompt_for(tokenizer)
    settings = dict(num_samples=3, max_tokens=20, temperature=1.5)
    first, _ = engine.generate_batch(prompt, seed=1, **settings)
    again, _ = engine.generate_batch(prompt, seed=1, **settings)
    other, _ = engine.generate_batch(prompt, seed=2, **settings)
    assert first == again
    assert first != other
    assert len({tuple(row) for row in first}) > 1  # rows are independent draws


def test_top_k_1_and_a_tiny_top_p_are_greedy(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompt_for(tokenizer, "a dog ran by the barn")
    greedy, _ = engine.generate_batch(prompt, 2, max_tokens=15, temperature=0.0)
    top_k, _ = engine.generate_batch(prompt, 2, max_tokens=15, temperature=1.0, top_k=1, seed=7)
    top_p, _ = engine.generate_batch(prompt, 2, max_tokens=15, temperature=1.0, top_p=1e-6)
    assert greedy == top_k == top_p
    assert greedy[0] == greedy_by_recompute(model, prompt, 15)


def test_rows_stop_at_assistant_end(model, tokenizer):
    """Make assistant_end's head row twice that of the 6th greedy token: its logit then beats
    everything at that step (or earlier), so greedy decoding must stop there."""
    prompt = prompt_for(tokenizer)
    free_run = greedy_by_recompute(model, prompt, 30)
    end = tokenizer.special_id("<|assistant_end|>")
    stopper = spread_gpt(tokenizer.vocab_size)
    with torch.no_grad():
        stopper.lm_head.weight[end] = 2 * stopper.lm_head.weight[free_run[5]]
    expected = greedy_by_recompute(stopper, prompt, 30, stop={end})
    assert expected[-1] == end and len(expected) <= 6

    engine = Engine(stopper, tokenizer)
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=30, temperature=0.0))
    assert [tokens for tokens, _ in steps] == [[t, t] for t in expected]
    replies, masks = engine.generate_batch(prompt, 2, max_tokens=30, temperature=0.0)
    assert replies == [expected[:-1]] * 2  # without the terminal token
    assert masks == [[1] * (len(expected) - 1)] * 2


def test_max_tokens_and_the_context_limit_end_generation(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompt_for(tokenizer)
    assert list(engine.generate(prompt, max_tokens=0)) == []
    room = engine.max_context - len(prompt)
    replies, _ = engine.generate_batch(prompt, max_tokens=10_000, temperature=0.0)
    assert len(replies[0]) == room  # prompt + reply fill the context exactly
    with pytest.raises(ValueError, match="leaves no room"):
        engine.generate([tokenizer.bos_id] * engine.max_context)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="num_samples"):
        engine.generate(prompt, num_samples=0)
    with pytest.raises(ValueError, match="one row"):
        engine.stream_events(prompt, num_samples=2)  # checked at the call, not lazily


def test_engines_in_threads_match_sequential_runs(model, tokenizer):
    prompt = prompt_for(tokenizer)
    settings = dict(num_samples=2, max_tokens=12, temperature=1.0, top_k=20)
    expected = [Engine(model, tokenizer).generate_batch(prompt, seed=s, **settings) for s in (3, 4)]
    results = [None, None]

    def work(i: int) -> None:
        results[i] = Engine(model, tokenizer).generate_batch(prompt, seed=3 + i, **settings)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


# --- the engine's state machine, driven by a scripted stand-in ----------------------------


class ScriptedModel(torch.nn.Module):
    """Stands in for GPT: after the prompt, row b predicts scripts[b][i] as generated token i
    (forced tokens count as generated). The prefill has one row, so every row's first token
    is scripts[0][0]. Tokens the tool should force sit in the script as JUNK, which the
    engine must never emit."""

    def __init__(self, scripts: list[list[int]], vocab_size: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device
        self.config = GPTConfig(vocab_size, n_layer=1, n_embd=8, n_head=1, n_kv_head=1)
        self.scripts = scripts
        self.prompt_len = 0

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        if kv_cache.pos == 0:
            self.prompt_len = T
        generated = kv_cache.pos + T - self.prompt_len
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            script = self.scripts[b]
            logits[b, -1, script[min(generated, len(script) - 1)]] = 10.0
        return logits


def merged(events):
    out: list[list[str]] = []
    for kind, text in events:
        if out and out[-1][0] == kind:
            out[-1][1] += text
        else:
            out.append([kind, text])
    return [tuple(e) for e in out]


def test_the_calculator_result_is_forced_into_the_row(tokenizer):
    sid = tokenizer.special_id
    ps, pe, os_, oe = (sid(f"<|{n}|>") for n in ("python_start", "python_end", "output_start",
                                                 "output_end"))  # fmt: skip
    end = sid("<|assistant_end|>")
    junk = tokenizer.encode("Z")[0]
    expr, three, tail = tokenizer.encode("1+2"), tokenizer.encode("3"), tokenizer.encode(" ok")
    forced = [os_, *three, oe]
    script = [ps, *expr, pe, *[junk] * len(forced), *tail, end]
    engine = Engine(ScriptedModel([script], tokenizer.vocab_size), tokenizer)
    prompt = prompt_for(tokenizer, "what is 1+2?")

    steps = list(engine.generate(prompt, max_tokens=50, temperature=0.0))
    assert [tokens[0] for tokens, _ in steps] == [ps, *expr, pe, *forced, *tail, end]
    written = [1] * (len(expr) + 2)
    assert [m[0] for _, m in steps] == written + [0] * len(forced) + [1] * (len(tail) + 1)

    replies, masks = engine.generate_batch(prompt, max_tokens=50, temperature=1.0)
    assert replies[0] == [ps, *expr, pe, *forced, *tail]
    assert masks[0] == written + [0] * len(forced) + [1] * len(tail)
    events = merged(engine.stream_events(prompt, temperature=0.0))
    assert events == [("python", "1+2"), ("output", "3"), ("text", " ok")]
    assert "".join(engine.stream_text(prompt, temperature=0.0)) == " ok"


def test_tool_state_is_per_row_and_done_rows_repeat_their_end(tokenizer):
    sid = tokenizer.special_id
    ps, pe, os_, oe = (sid(f"<|{n}|>") for n in ("python_start", "python_end", "output_start",
                                                 "output_end"))  # fmt: skip
    end, bos = sid("<|assistant_end|>"), sid("<|bos|>")
    junk = tokenizer.encode("Z")[0]
    name = tokenizer.encode("x+1")  # refused by the calculator: nothing is forced
    six = [os_, *tokenizer.encode("6"), oe]
    row0 = [ps, *name, pe, end]
    row1 = [ps, *tokenizer.encode("2*3"), pe, *[junk] * len(six), bos]
    engine = Engine(ScriptedModel([row0, row1], tokenizer.vocab_size), tokenizer)
    steps = list(engine.generate(prompt_for(tokenizer), 2, max_tokens=50, temperature=0.0))

    assert [tokens[1] for tokens, _ in steps] == row1[: len(row1) - len(six) - 1] + six + [bos]
    done_at = len(row0) - 1
    assert [tokens[0] for tokens, _ in steps[: done_at + 1]] == row0
    assert [m[0] for _, m in steps[: done_at + 1]] == [1] * len(row0)
    assert all(tokens[0] == end and m[0] == 0 for tokens, m in steps[done_at + 1 :])
    replies, masks = engine.generate_batch(prompt_for(tokenizer), 2, temperature=0.0)
    assert replies[0] == row0[:-1] and masks[0] == [1] * (len(row0) - 1)
    assert replies[1][-len(six) :] == six and masks[1][-len(six) :] == [0] * len(six)


def test_streaming_never_splits_a_utf8_character(tokenizer):
    byte_id = {tokenizer.id_to_bytes(i): i for i in range(tokenizer.vocab_size - 9)}
    text = "a🎉b語c"
    script = [byte_id[bytes([b])] for b in text.encode("utf-8")]  # one byte per token
    script.append(tokenizer.special_id("<|assistant_end|>"))
    engine = Engine(ScriptedModel([script], tokenizer.vocab_size), tokenizer)
    pieces = list(engine.stream_text(prompt_for(tokenizer), temperature=0.0))
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "🎉" in pieces and "語" in pieces  # each arrives whole, in one piece


def test_invalid_utf8_is_replaced_not_held_forever(tokenizer):
    byte_id = {tokenizer.id_to_bytes(i): i for i in range(tokenizer.vocab_size - 9)}
    script = [byte_id[b"a"], byte_id[b"\xf0"], byte_id[b"\x9f"]]  # a 4-byte start, cut short
    engine = Engine(ScriptedModel([script], tokenizer.vocab_size), tokenizer)
    out = "".join(engine.stream_text(prompt_for(tokenizer), max_tokens=3, temperature=0.0))
    assert out == "a\ufffd"


# --- the calculator ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, result",
    [
        ("1+2", "3"),
        ("48/2", "24"),
        ("10/4", "2.5"),
        ("(3 + 4) * 2 - -1", "15"),
        ("0.1+0.2", "0.3"),
        ("1,000 * 3", "3000"),
        (" 12.5*4 ", "50"),
        ("'strawberry'.count('r')", "3"),
        ('"banana".count("an")', "2"),
        ("'strawberry'.count('r') + 1", "4"),
    ],
)
def test_calculator_does_arithmetic_and_counting(expr, result):
    assert use_calculator(expr) == result


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "__import__('os').system('echo hacked')",
        "os.system('ls')",
        "x + 1",
        "lambda: 1",
        "9**9**9",
        "2**10",
        "7 // 2",
        "7 % 3",
        "'a' * 10",
        "'abc'.upper()",
        "'abc'.count(x)",
        "[1, 2][0]",
        "().__class__.__bases__",
        "open('/etc/passwd').read()",
        "1/0",
        "1" * 400,
        "",
        "1 +",
    ],
)
def test_calculator_refuses_everything_else_quickly(expr):
    start = time.monotonic()
    assert use_calculator(expr) is None
    assert time.monotonic() - start < 0.1
