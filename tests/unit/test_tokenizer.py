"""Tokenizer (nanochat/tokenizer.py) and stage 2 (scripts/tok_train.py, scripts/tok_eval.py).

A real BPE is trained once per module on ~300 KB of generated text; the stage scripts run
end to end on small shards in a temp BASE_DIR. CPU only, offline.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from helpers.builders import ROUND_TRIP

from nanochat import tokenizer as tokmod
from nanochat.common import run_main
from nanochat.data.shards import data_dir, list_shards, shard_name, write_shard
from nanochat.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    tokenizer_dir,
    train_tokenizer,
)
from scripts import tok_eval, tok_train

VOCAB = 512

SYLLABLES = "ka lo mi ne ru sa ti vo ze the and ing ion er re st pro con".split()
UNICODE_BITS = [
    "東京は日本の首都です。",
    "北京是中国的首都。",
    "Crème brûlée à la française, naïve café.",
    "Привет, как дела?",
    "I like 🍕 and 🎉!",
    "e\u0301 n\u0303 a\u0308",  # combining marks
]
CODE_BITS = [
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n    print(i)\n",
    "if (a && b) { return c[i]; }\n",
]


def make_documents(n_docs: int, seed: int) -> list[str]:
    """Varied text: invented words, numbers, code and non-ASCII snippets."""
    rng = random.Random(seed)
    words = ["".join(rng.sample(SYLLABLES, rng.randint(1, 3))) for _ in range(400)]
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(20, 60)):
            roll = rng.random()
            if roll < 0.08:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif roll < 0.12:
                parts.append(rng.choice(UNICODE_BITS))
            elif roll < 0.14:
                parts.append(rng.choice(CODE_BITS))
            else:
                parts.append(rng.choice(words))
        docs.append(" ".join(parts).capitalize() + ".")
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_documents(1200, seed=0)  # ~300 KB


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return train_tokenizer(iter(corpus), VOCAB)


# --- vocabulary --------------------------------------------------------------------------


def test_vocab_size_and_special_ids_at_the_top(tok):
    assert tok.vocab_size == VOCAB
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.bos_id == VOCAB - 9
    assert tok.id_to_bytes(tok.bos_id) == b"<|bos|>"
    with pytest.raises(KeyError, match="unknown special token"):
        tok.special_id("<|eos|>")


def test_train_rejects_too_small_vocab(corpus):
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(iter(corpus[:10]), MIN_VOCAB_SIZE - 1)


def test_split_pattern_groups_digits_by_two():
    assert r"\p{N}{1,2}" in tokmod.SPLIT_PATTERN and r"\p{N}{1,3}" not in tokmod.SPLIT_PATTERN


def test_digits_are_grouped_at_most_two(tok):
    for number in ["7", "42", "123", "2024", "9876543210", "x=31415926 y=27"]:
        ids = tok.encode(number)
        assert tok.decode(ids) == number
        for i in ids:
            assert sum(ch.isdigit() for ch in tok.id_to_bytes(i).decode("utf-8")) <= 2
    # and the corpus, full of numbers, taught it some two-digit tokens
    assert any(tok.id_to_bytes(i).isdigit() and len(tok.id_to_bytes(i)) == 2 for i in range(VOCAB))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size - len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text


def test_batch_encode_and_prepend_append(tok):
    texts = ROUND_TRIP[1:5]
    assert tok.encode(texts) == [tok.encode(t) for t in texts]
    framed = tok.encode(texts, prepend="<|bos|>", append=tok.special_id("<|assistant_end|>"))
    for ids, text in zip(framed, texts, strict=True):
        assert ids == [tok.bos_id, *tok.encode(text), tok.special_id("<|assistant_end|>")]
    assert tok.encode("", prepend=tok.bos_id) == [tok.bos_id]
    with pytest.raises(ValueError):
        tok.encode("x", prepend=VOCAB)
    with pytest.raises(KeyError):
        tok.encode("x", append="<|nope|>")


def test_special_token_text_is_never_parsed(tok):
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"before {name} after")
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == f"before {name} after"
    assert tok.encode(["<|bos|>"]) == [tok.encode("<|bos|>")]


def test_token_byte_lengths_come_from_raw_bytes(tok):
    lengths = tok.token_byte_lengths()
    n_learned = VOCAB - len(SPECIAL_TOKENS)
    assert len(lengths) == VOCAB
    assert lengths[n_learned:] == [0] * len(SPECIAL_TOKENS)
    assert lengths[:n_learned] == [len(tok.id_to_bytes(i)) for i in range(n_learned)]

    def invalid_alone(token: bytes) -> bool:
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    broken = [i for i in range(n_learned) if invalid_alone(tok.id_to_bytes(i))]
    # bytes 0x80..0xff alone, plus merges of partial characters the corpus taught it
    assert set(range(0x80, 0x100)) <= set(broken)
    assert any(i >= 256 for i in broken)
    # a str round trip would have counted 3 bytes (U+FFFD) for each lone high byte
    assert all(lengths[i] == 1 for i in range(0x80, 0x100))


# --- files -------------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    written = []
    for name in ("atomic_write_bytes", "atomic_write_text"):
        original = getattr(tokmod, name)

        def spy(path, data, original=original):
            written.append(Path(path).name)
            original(path, data)

        monkeypatch.setattr(tokmod, name, spy)
    monkeypatch.setattr(tok, "trained_on", {"dataset": "unit", "chars": 123})
    folder = tok.save(tmp_path / "tokenizer")

    assert written[-1] == "tokenizer.json"  # the completeness marker goes last
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.tiktoken",
        "token_bytes.json",
        "tokenizer.json",
    ]  # no temp files left behind
    meta = json.loads((folder / "tokenizer.json").read_text())
    assert meta["vocab_size"] == VOCAB
    assert meta["special_tokens"]["<|bos|>"] == tok.bos_id
    assert meta["trained_on"] == {"dataset": "unit", "chars": 123}
    assert json.loads((folder / "token_bytes.json").read_text()) == tok.token_byte_lengths()
    first = (folder / "merges.tiktoken").read_text().splitlines()[0]
    assert first == "AA== 0"  # tiktoken's format: base64 of b"\x00", space, rank

    loaded = Tokenizer.load(folder)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.trained_on == tok.trained_on
    assert loaded.encode(ROUND_TRIP) == tok.encode(ROUND_TRIP)
    assert loaded.token_byte_lengths() == tok.token_byte_lengths()


@pytest.mark.parametrize("remove", [None, "tokenizer.json", "merges.tiktoken", "token_bytes.json"])
def test_load_incomplete_folder_says_run_make_tokenizer(tok, tmp_path, remove):
    folder = tmp_path / "tokenizer"
    if remove is not None:
        tok.save(folder)
        (folder / remove).unlink()
    with pytest.raises(FileNotFoundError, match="run `make tokenizer` first"):
        Tokenizer.load(folder)


def test_load_rejects_files_that_disagree(tok, tmp_path):
    folder = tok.save(tmp_path / "tokenizer")
    lengths = tok.token_byte_lengths()
    lengths[300] += 1
    (folder / "token_bytes.json").write_text(json.dumps(lengths))
    with pytest.raises(TokenizerError, match="token_bytes.json does not match the size and sha256"):
        Tokenizer.load(folder)
    # A tokenizer saved before the hashes existed is still cross-checked file against file.
    meta = json.loads((folder / "tokenizer.json").read_text())
    del meta["files"], meta["sha256"]
    (folder / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="disagree"):
        Tokenizer.load(folder)


# --- chat rendering ------------------------------------------------------------------------


def S(tok, name):  # noqa: N802 - reads like a token in the expectations below
    return [tok.special_id(f"<|{name}|>")]


def test_render_simple_conversation(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [
        (S(tok, "bos"), 0),
        (S(tok, "user_start") + e("Hi there") + S(tok, "user_end"), 0),
        (S(tok, "assistant_start"), 0),
        (e("Hello!") + S(tok, "assistant_end"), 1),
        (S(tok, "user_start") + e("2+2?") + S(tok, "user_end"), 0),
        (S(tok, "assistant_start"), 0),
        (e("4") + S(tok, "assistant_end"), 1),
    ]
    assert ids == [i for chunk, _ in expected for i in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]
    supervised = re.findall(r"\x1b\[92m(.*?)\x1b\[0m", tok.visualize(ids, mask))
    assert "".join(supervised) == "Hello!<|assistant_end|>4<|assistant_end|>"


def test_render_merges_system_into_first_user(tok):
    with_system = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ]
    }
    merged = {
        "messages": [
            {"role": "user", "content": "Be brief.\n\nHi"},
            {"role": "assistant", "content": "Yo"},
        ]
    }
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)


def test_render_tool_parts(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "What is 6*7?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute. "},
                    {"type": "python", "text": "6*7"},
                    {"type": "python_output", "text": "42"},
                    {"type": "text", "text": " It is 42."},
                ],
            },
        ]
    }
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [
        (S(tok, "bos") + S(tok, "user_start") + e("What is 6*7?") + S(tok, "user_end"), 0),
        (S(tok, "assistant_start"), 0),
        (e("Let me compute. "), 1),
        (S(tok, "python_start") + e("6*7") + S(tok, "python_end"), 1),
        (S(tok, "output_start") + e("42") + S(tok, "output_end"), 0),
        (e(" It is 42.") + S(tok, "assistant_end"), 1),
    ]
    assert ids == [i for chunk, _ in expected for i in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]


def test_render_truncates_to_max_tokens(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "word " * 50},
            {"role": "assistant", "content": "reply " * 50},
        ]
    }
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=20)
    assert len(full_ids) > 20
    assert ids == full_ids[:20] and mask == full_mask[:20]
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(conv, max_tokens=0)


def user(text):
    return {"role": "user", "content": text}


def assistant(content):
    return {"role": "assistant", "content": content}


BAD_CONVERSATIONS = {
    "empty": ({"messages": []}, "at least one message"),
    "not a dict": (["hi"], "at least one message"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    "starts with assistant": ({"messages": [assistant("x")]}, "expected role 'user'"),
    "two users": ({"messages": [user("a"), user("b")]}, "alternate"),
    "two assistants": ({"messages": [user("a"), assistant("b"), assistant("c")]}, "alternate"),
    "late system": (
        {"messages": [user("a"), assistant("b"), {"role": "system", "content": "c"}]},
        "system message may only come first",
    ),
    "system alone": ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user"),
    "unknown part": (
        {"messages": [user("a"), assistant([{"type": "image", "text": "x"}])]},
        "unknown part type 'image'",
    ),
    "part without text": (
        {"messages": [user("a"), assistant([{"type": "python"}])]},
        "needs a string 'text'",
    ),
    "user content list": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        "must be a string",
    ),
    "missing content": ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
}


@pytest.mark.parametrize("name", BAD_CONVERSATIONS)
def test_render_rejects_malformed_conversations(tok, name):
    conversation, message = BAD_CONVERSATIONS[name]
    with pytest.raises(ValueError, match=message):
        tok.render_conversation(conversation)


def test_render_for_completion(tok):
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            user("Hi"),
            assistant("Hello"),
            user("Bye?"),
            assistant("Bye!"),
        ]
    }
    prompt = tok.render_for_completion(conv)
    shorter = {"messages": conv["messages"][:-1]}
    assert prompt == tok.render_conversation(shorter)[0] + S(tok, "assistant_start")
    assert tok.encode("Bye!")[0] not in prompt[-2:]
    with pytest.raises(ValueError, match="ending with assistant"):
        tok.render_for_completion(shorter)


# --- stage 2 scripts -----------------------------------------------------------------------

VAL_MARKER = "Qzxvalidationonly"


def make_dataset(base: Path, name: str = "testset") -> Path:
    """Two training shards of generated text and a validation shard whose text is unique."""
    folder = data_dir(base, name)
    write_shard(folder / shard_name(0), make_documents(150, seed=1))
    write_shard(folder / shard_name(1), make_documents(150, seed=2))
    write_shard(folder / shard_name(2), [f"{VAL_MARKER} " * 300] * 50)
    return folder


def test_tok_train_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_dataset(tmp_path)
    argv = ["--dataset", "testset", "--vocab-size", "400", "--max-chars", "60000"]
    assert tok_train.main(["--", *argv, "--doc-cap", "500"]) == 0

    meta = json.loads((tokenizer_dir(tmp_path) / "tokenizer.json").read_text())
    trained_on = meta["trained_on"]
    assert trained_on["dataset"] == "testset"
    assert trained_on["chars"] == 60000  # the budget, exactly: the last doc is cropped
    assert trained_on["docs"] >= 60000 // 500  # every doc cropped to at most 500 chars
    assert trained_on["train_shards"] == 2 and trained_on["seconds"] >= 0

    tok = Tokenizer.load(tokenizer_dir(tmp_path))
    assert tok.vocab_size == 400
    # the validation shard's word would be a few tokens had training read it
    assert len(tok.encode(VAL_MARKER)) > 3
    out = capsys.readouterr().out
    assert "vocab size: 400" in out and "training time" in out
    section = (tmp_path / "report" / "tokenizer.md").read_text()
    assert "Tokenizer training" in section and "60,000 chars" in section


def test_tok_eval_offline_table(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_dataset(tmp_path)
    tok_train.main(["--dataset", "testset", "--vocab-size", "400", "--max-chars", "20000"])
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "TIKTOKEN_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tok_eval", "--max-chars", "30000"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # a network fetch would hang here instead of failing fast
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines()}
    for label in ["train (held out)", "validation", "prose", "code", "math", "non-English"]:
        assert label in rows
        assert rows[label].count("unavailable (offline)") == 2  # GPT-2 and GPT-4 columns
    assert "30,000" in rows["train (held out)"] and "30,000" in rows["validation"]
    assert "ours tokens (bytes/token)" in result.stdout
    assert list(cache.iterdir()) == []  # nothing was fetched
    section = (tmp_path / "report" / "tokenizer-eval.md").read_text()
    assert "| validation |" in section


def test_tok_eval_when_training_read_every_document(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    make_dataset(tmp_path)
    tok_train.main(["--dataset", "testset", "--vocab-size", "300"])  # default budget: all
    capsys.readouterr()
    assert tok_eval.main(["--max-chars", "5000"]) == 0
    out = capsys.readouterr().out
    assert "train (seen in training)" in out and "train (held out)" not in out


def test_tok_eval_held_out_text_starts_after_the_trained_documents(tmp_path):
    folder = make_dataset(tmp_path)
    paths = list_shards(folder)[:2]  # the folder also holds the shards' records
    docs = make_documents(150, seed=1) + make_documents(150, seed=2)
    assert list(tok_eval.held_out_train(paths, 0, 0)) == docs
    assert list(tok_eval.held_out_train(paths, 10, 1)) == docs[10:]
    assert list(tok_eval.held_out_train(paths, 160, 2)) == docs[160:]
    assert list(tok_eval.held_out_train(paths, 300, 2)) == []


def test_reference_encodings_need_a_valid_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url, sha256 = tok_eval.REFERENCES["GPT-4"][1][0]
    assert not tok_eval.is_cached(url, sha256)
    # a damaged cached file would make tiktoken download again: treat it as missing
    import hashlib

    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"damaged")
    assert not tok_eval.is_cached(url, sha256)
    assert tok_eval.load_reference("GPT-4") is None
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # caching disabled: always a download
    assert tok_eval.tiktoken_cache_dir() is None and tok_eval.load_reference("GPT-2") is None


def test_tok_eval_without_tokenizer_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: tok_eval.main([]))  # as `python -m scripts.tok_eval` runs it
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run `make tokenizer` first" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nothing-here"], "no shards in"),
        (["--vocab-size", "265"], "--vocab-size must be at least 266"),
        (["--max-chars", "lots"], "expected a positive integer, got 'lots'"),
        (["--doc-cap", "0"], "expected a positive integer, got '0'"),
    ],
)
def test_tok_train_bad_input_is_one_line_exit_2(tmp_path, args, message):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tok_train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not tokenizer_dir(tmp_path).exists()


def test_tok_train_embedded_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    args = ["--dataset", "embedded", "--vocab-size", "1024", "--max-chars", "300000"]
    assert tok_train.main(args) == 0
    tok = Tokenizer.load(tokenizer_dir(tmp_path))
    assert tok.trained_on["dataset"] == "embedded" and tok.trained_on["chars"] > 0
    assert tok.decode(tok.encode("Return the value.")) == "Return the value."


@pytest.mark.parametrize("args", [["--max-chars", "0"], ["--max-chars", "1e6"]])
def test_tok_eval_bad_input_is_one_line_exit_2(tmp_path, args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tok_eval", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "expected a positive integer" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written, not even a report section


def test_bad_input_leaves_an_existing_tokenizer_untouched(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    saved = tok.save(tokenizer_dir(tmp_path))
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(["--dataset", "nothing-here", "--vocab-size", "512"])
    assert exit_info.value.code == 2
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
