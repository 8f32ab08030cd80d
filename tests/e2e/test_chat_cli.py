"""Stage chat-cli (scripts/chat_cli.py) and checkpoint loading (nanochat/inference/engine.py's
load_chat_model) on a tiny random checkpoint written into the test's BASE_DIR: one-shot
answers, the REPL driven through stdin, and one-line errors naming the stage to run first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers.builders import save_checkpoint, spread_logits, tiny_gpt, tokenizer_for, word_texts

from nanochat.common import UsageError
from nanochat.inference.engine import load_chat_model
from nanochat.model.gpt import GPTConfig

WORDS = "hello there how are you today the weather is fine and warm in the park".split()


def write_tokenizer(base: Path):
    return tokenizer_for(word_texts(WORDS, 150, shortest=3, spread=8), 300, base)


def write_checkpoint(
    base: Path, kind: str = "base", tag: str = "d2", step: int = 10, prefix: str = ""
) -> Path:
    """A 2-layer GPT with random output projections and its special tokens suppressed (so a
    greedy reply is never empty), saved the way the training stages save it."""
    config = GPTConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, sequence_len=96)
    model = spread_logits(tiny_gpt(config, seed=step))
    return save_checkpoint(base, model, kind, tag, step, prefix=prefix)


@pytest.fixture
def base_only(base_dir):
    write_tokenizer(base_dir)
    write_checkpoint(base_dir)
    return base_dir


def chat_cli(args: list[str], stdin: str = "", timeout: float = 60):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scripts.chat_cli", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the command ---------------------------------------------------------------------------


def test_one_shot_prompt_streams_an_answer(base_only):
    result = chat_cli(["-i", "base", "-p", "Hello", "-t", "0", "--max-tokens", "8"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    assert "base model d2 step 10" in result.stderr


def test_a_missing_stage_is_one_line_and_exit_2(base_only):
    result = chat_cli(["-i", "sft", "-p", "Hello"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no sft checkpoint under" in lines[0]
    assert "run `make sft` first (or -i base)" in lines[0]


def test_the_repl_reads_stdin_and_runs_commands(base_only):
    result = chat_cli([], stdin="hi\n/temperature 0.5\n/clear\n/help\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base model d2" in result.stderr  # auto found the base checkpoint
    lines = result.stdout.splitlines()
    assert "(temperature 0.5)" in lines
    assert "(conversation cleared)" in lines
    assert any(line.startswith("  /temperature") for line in lines)
    assert lines[0] not in ("(temperature 0.5)", "")  # the reply to "hi" came first
    assert not (base_only / "logs" / "chat_history").exists()  # no history without a tty


def test_no_input_at_all_is_an_error_not_a_silent_exit_0(base_only):
    """What a container without a keyboard gives the REPL: standard input at its end."""
    result = chat_cli([], stdin="")
    assert result.returncode == 2
    assert result.stdout == ""
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: no input: chat-cli reads your messages from a terminal")
    assert "-p" in error


# --- loading -------------------------------------------------------------------------------


def test_auto_takes_the_most_trained_stage(base_dir):
    with pytest.raises(UsageError, match=r"^no model yet: run `make pretrain` first$"):
        load_chat_model(base_dir)
    write_tokenizer(base_dir)
    write_checkpoint(base_dir)
    model, tokenizer, meta = load_chat_model(base_dir, "auto")
    assert (meta["source"], meta["tag"], meta["step"]) == ("base", "d2", 10)
    assert not model.training and model.config.vocab_size == tokenizer.vocab_size
    write_checkpoint(base_dir, "mid", step=20, prefix="_orig_mod.")  # saved through compile
    model, _, meta = load_chat_model(base_dir)
    assert (meta["source"], meta["step"]) == ("mid", 20)
    base_model, _, _ = load_chat_model(base_dir, "base")
    assert not torch.equal(model.lm_head.weight, base_model.lm_head.weight)


def test_tags_and_steps(base_dir):
    write_tokenizer(base_dir)
    old = write_checkpoint(base_dir, tag="old", step=5)
    write_checkpoint(base_dir, tag="new", step=7)
    os.utime(old / "meta_000005.json", (1, 1))  # "old" was written long ago
    assert load_chat_model(base_dir, "base")[2]["tag"] == "new"
    assert load_chat_model(base_dir, "base", tag="old")[2]["step"] == 5
    with pytest.raises(UsageError, match=r"no complete base checkpoint in .*nope \(tags: new, old"):
        load_chat_model(base_dir, "base", tag="nope")
    with pytest.raises(UsageError, match=r"no checkpoint of step 6 .*\(steps: 7\)"):
        load_chat_model(base_dir, "base", tag="new", step=6)


def test_missing_pieces_say_what_to_run(base_dir):
    write_checkpoint(base_dir)
    with pytest.raises(UsageError, match="run `make tokenizer` first"):
        load_chat_model(base_dir, "base")
    with pytest.raises(UsageError, match=r"run `make midtrain` first \(or -i base\)$"):
        load_chat_model(base_dir, "mid")
    with pytest.raises(UsageError, match=r"no rl checkpoint under .*rl_checkpoints: run `make rl`"):
        load_chat_model(base_dir, "rl")


# --- the conversation display, with a stand-in engine ----------------------------------------


class FakeEngine:
    """Replays fixed (kind, text) events; ``interrupt`` raises Ctrl-C after them."""

    max_context = 96

    def __init__(self, events, interrupt: bool = False) -> None:
        self.events, self.interrupt, self.prompts = events, interrupt, []

    def stream_events(self, tokens, **settings):
        self.prompts.append(list(tokens))

        def replay():
            yield from self.events
            if self.interrupt:
                raise KeyboardInterrupt

        return replay()


def make_chat(base_dir, engine, max_tokens=16):
    import io

    from scripts.chat_cli import Chat, build_parser

    args = build_parser().parse_args(["--max-tokens", str(max_tokens), "--seed", "1"])
    out = io.StringIO()
    return Chat(engine, write_tokenizer(base_dir), args, out=out), out


def test_tool_calls_are_shown_apart_and_kept_in_the_history(base_dir):
    events = [("text", "so "), ("python", "1+"), ("python", "2"), ("output", "3"),
              ("text", " it is\x07")]  # fmt: skip
    chat, out = make_chat(base_dir, FakeEngine(events))
    chat.ask("what is 1+2?")
    assert out.getvalue() == "so [python: 1+2][= 3] it is\\x07\n"
    assert chat.messages[-1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "so "},
            {"type": "python", "text": "1+2"},
            {"type": "python_output", "text": "3"},
            {"type": "text", "text": " it is\x07"},
        ],
    }
    chat.ask("thanks")  # the tool parts render back into the next prompt
    assert len(chat.messages) == 4


def test_ctrl_c_stops_the_reply_not_the_chat(base_dir):
    chat, out = make_chat(base_dir, FakeEngine([("text", "Hel")], interrupt=True))
    chat.ask("hi")
    assert out.getvalue() == "Hel [stopped]\n"
    assert chat.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hel"},
    ]


def test_old_turns_are_dropped_to_fit_the_context(base_dir):
    engine = FakeEngine([("text", "ok")])
    chat, _ = make_chat(base_dir, engine, max_tokens=40)
    for _ in range(6):
        chat.ask("hello there how are you today")
    assert all(len(p) + 40 <= engine.max_context for p in engine.prompts)
    assert len(chat.messages) < 12
    assert chat.messages[0]["role"] == "user"
    with pytest.raises(UsageError, match="the model's context holds 96"):
        chat.fit([{"role": "user", "content": "the weather " * 200}])
