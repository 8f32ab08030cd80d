"""Damaged artifacts on disk and on the wire: each is refused, repaired where it can be, and
reported in one line naming the file and what to do; never a traceback, never a silent
wrong result. Real files, real stage processes, a real HTTP server on 127.0.0.1.

Shards (nanochat/data/shards.py, dataset.py, download.py, dataloader.py): a shard is decoded whole
before it gets its final name and its size + sha256 are recorded; re-runs and readers check
them. Tokenizer (nanochat/tokenizer.py): tokenizer.json records the other files' hashes and
its own. CPU, offline, about 20 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from urllib.parse import parse_qs

import pyarrow.parquet as pq
import pytest
from conftest import run_cli, write_corpus
from helpers import pretrain
from helpers.builders import save_checkpoint, tiny_gpt, tokenizer_for
from helpers.hub import DatasetHub

from nanochat import tokenizer as tokmod
from nanochat.data import dataset, shards
from nanochat.tokenizer import Tokenizer, tokenizer_dir

VAL = dataset.REMOTE_DATASETS["climbmix"].validation_index
HUB_REPO = dataset.REMOTE_DATASETS["climbmix"].repo
WORDS = "the model reads packed rows of tokens and learns to predict what comes next".split()


# ----------------------------------------------------------------------------- helpers


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(20, 80))) + f" {seed}-{i}." for i in range(n)]


def shard_body(tmp_path: Path, index: int) -> bytes:
    """A valid shard of 64 documents in 8 row groups (so a flip lands inside a data page)."""
    path = tmp_path / "fixture_shards" / shards.shard_name(index)
    shards.write_shard(path, documents(64, seed=index), row_group_size=8)
    return path.read_bytes()


def flipped(body: bytes, n: int = 16) -> bytes:
    """``n`` bytes inverted halfway through the data pages (between the leading magic and
    the footer): the footer, and so parquet's metadata, still reads."""
    data = bytearray(body)
    footer = int.from_bytes(data[-8:-4], "little")
    at = 4 + (len(data) - 8 - footer - 4) // 2
    for i in range(at, at + n):
        data[i] ^= 0xFF
    return bytes(data)


def flip_file(path: Path) -> None:
    path.write_bytes(flipped(path.read_bytes()))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(result, *words: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def hub():
    server = DatasetHub()
    yield server
    server.close()


@pytest.fixture
def good(tmp_path):
    """Valid shard bodies for the three shards a ``--shards 2`` run asks for."""
    return {index: shard_body(tmp_path, index) for index in (0, 1, VAL)}


def download(*extra: str, env: dict | None = None):
    """Stage 1 for climbmix shards 0, 1 and validation, as a real process."""
    argv = [sys.executable, "-m", "scripts.download", "--dataset", "climbmix", "--shards", "2"]
    argv += ["--retry-delay", "0.01", "--timeout", "5", "--workers", "3", *extra]
    return run_cli(argv, env=env)


def download_from_mirror(hub: DatasetHub, good: dict, *extra: str):
    for index, body in good.items():
        if shards.shard_name(index) not in hub.answers:
            hub.serve(index, body)
    return download("--source", f"{hub.url}/mirror", *extra)


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def tiny_tokenizer():
    return tokenizer_for(documents(200, seed=99))


# ----------------------------------------------------------------------------- shards


def test_download_rerun_refetches_a_shard_with_flipped_bytes(hub, good, base_dir):
    assert download_from_mirror(hub, good).returncode == 0
    folder = shards.data_dir(base_dir, "climbmix")
    target = folder / shards.shard_name(1)
    flip_file(target)
    with pytest.raises(OSError, match="ZSTD"):  # the page really is damaged
        pq.read_table(target)

    result = download_from_mirror(hub, good)
    assert result.returncode == 0, result.stderr
    assert "shard_00001.parquet is present but invalid" in result.stderr
    assert "does not match its recorded sha256" in result.stderr
    assert hub.count(1) == 2 and hub.count(0) == 1  # only the damaged one fetched again
    assert target.read_bytes() == good[1]
    assert "1 shard(s) fetched, 2 skipped, 1 damaged one(s) replaced" in result.stdout


def test_a_damaged_shard_whose_refetch_failed_is_never_adopted_as_good(hub, good, base_dir):
    """The mirror is down when a rerun finds the damage: the shard keeps its record (so it
    stays known as damaged) instead of being recorded as good by the next rerun."""
    assert download_from_mirror(hub, good).returncode == 0
    target = shards.data_dir(base_dir, "climbmix") / shards.shard_name(1)
    target.write_bytes(good[0])  # wrong content that still decodes: only its record tells
    hub.serve(1)  # 404 from now on
    assert download_from_mirror(hub, good, "--retries", "1").returncode == 1
    again = download_from_mirror(hub, good, "--retries", "1")
    assert again.returncode == 1 and "present but invalid" in again.stderr
    hub.serve(1, good[1])
    assert download_from_mirror(hub, good).returncode == 0
    assert target.read_bytes() == good[1]


def test_a_shard_with_invalid_utf8_is_refused_like_a_damaged_one(tmp_path):
    """Decoding alone does not check UTF-8 (reading the texts later does): the check must."""
    import pyarrow as pa

    path = tmp_path / "bad.parquet"
    bad = pa.array([b"ok", b"\xff\xfe not utf-8"], type=pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": bad}), path)
    reason = shards.verify_shard(path)
    assert reason is not None and "does not decode" in reason and "UTF8" in reason, reason


def test_download_checks_every_shard_in_the_folder_not_only_those_asked_for(hub, good, base_dir):
    """Pretraining reads every shard there; `make download` with a smaller SHARDS repairs
    a damaged one it did not ask for, instead of reporting all good."""
    extra = shard_body(base_dir.parent, 2)
    hub.serve(2, extra)
    assert download_from_mirror(hub, good, "--shards", "3").returncode == 0
    target = shards.data_dir(base_dir, "climbmix") / shards.shard_name(2)
    flip_file(target)
    result = download_from_mirror(hub, good)  # --shards 2: shards 0, 1 and validation
    assert result.returncode == 0, result.stderr
    assert "shard_00002.parquet is present but invalid" in result.stderr
    assert target.read_bytes() == extra


def test_loader_on_a_flipped_shard_stops_with_one_line(hub, good, base_dir):
    from nanochat.data.dataloader import PackedLoader

    assert download_from_mirror(hub, good).returncode == 0
    train, _ = shards.split_shards(shards.data_dir(base_dir, "climbmix"))
    flip_file(train[0])
    tok = tiny_tokenizer()
    loader = PackedLoader(train, tok, batch_size=2, seq_len=32)  # the sizes still match
    with pytest.raises(shards.ShardError) as caught:
        loader.next_batch()
    message = str(caught.value)
    assert "\n" not in message and str(train[0]) in message
    assert "recorded sha256" in message and "make download" in message

    # Shards fetched by an older version have no record: the bad page still gives one line.
    (train[0].parent / shards.RECORDS_FILE).unlink()
    loader = PackedLoader(train, tok, batch_size=2, seq_len=32)
    with pytest.raises(shards.ShardError) as caught:
        loader.next_batch()
    message = str(caught.value)
    assert "\n" not in message and str(train[0]) in message and "does not decode" in message


def test_loader_start_refuses_a_shard_whose_size_changed(hub, good, base_dir):
    from nanochat.data.dataloader import PackedLoader

    assert download_from_mirror(hub, good).returncode == 0
    train, _ = shards.split_shards(shards.data_dir(base_dir, "climbmix"))
    with open(train[1], "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(shards.ShardError, match=f"{len(good[1]) + 10} bytes, {len(good[1])}"):
        PackedLoader(train, tiny_tokenizer(), batch_size=2, seq_len=32)


def test_tok_train_on_a_flipped_shard_says_one_line(hub, good, base_dir):
    assert download_from_mirror(hub, good).returncode == 0
    flip_file(shards.data_dir(base_dir, "climbmix") / shards.shard_name(0))
    result = run_cli([sys.executable, "-m", "scripts.tok_train", "--vocab-size", "300"])
    assert result.returncode == 1
    assert_one_error_line(result, "shard_00000.parquet", "make download")
    assert not tokenizer_dir(base_dir).exists()


def test_mirror_serving_a_corrupt_shard_never_saves_it(hub, good, base_dir):
    hub.serve(0, flipped(good[0]), good[0])  # damaged once, then whole: retried, saved
    hub.serve(1, flipped(good[1]))  # always damaged: given up on
    result = download_from_mirror(hub, good, "--retries", "3")
    assert result.returncode == 1
    folder = shards.data_dir(base_dir, "climbmix")
    assert (folder / shards.shard_name(0)).read_bytes() == good[0]
    assert not (folder / shards.shard_name(1)).exists()
    assert temp_files(folder) == []
    assert hub.count(0) == 2 and hub.count(1) == 3
    shard_lines = [line for line in error_lines(result.stderr) if "shard 1 " in line]
    assert len(shard_lines) == 1, result.stderr
    assert "shard_00001.parquet" in shard_lines[0] and "does not decode" in shard_lines[0]
    assert "gave up after 3 attempts" in shard_lines[0]
    assert "Traceback" not in result.stderr
    records = shards.read_records(folder)
    assert sorted(records) == [shards.shard_name(0), shards.shard_name(VAL)]


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_hub_listing_mismatch_is_refused(hub, good, base_dir, wrong):
    for index, body in good.items():
        hub.serve(index, body)
        if index == 0 and wrong == "size":
            hub.list(index, body, size=len(body) + 1)
        elif index == 0:
            hub.list(index, body, sha256="0" * 64)
        else:
            hub.list(index, body)
    result = download("--retries", "2", env={"HF_ENDPOINT": hub.url})
    assert result.returncode == 1
    line = next(line for line in error_lines(result.stderr) if "shard 0 " in line)
    assert f"{wrong} mismatch with the listing" in line and "shard_00000.parquet" in line
    folder = shards.data_dir(base_dir, "climbmix")
    assert not (folder / shards.shard_name(0)).exists()
    posts = [body for method, _, body in hub.requests if method == "POST"]
    assert posts and "shard_00000.parquet" in parse_qs(posts[0].decode())["paths"]

    # The listing right: the same bodies are accepted and recorded with the listed hashes.
    hub.listing = []
    for index, body in good.items():
        hub.list(index, body)
    assert download(env={"HF_ENDPOINT": hub.url}).returncode == 0
    records = shards.read_records(folder)
    for index, body in good.items():
        want = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        assert records[shards.shard_name(index)] == want


def test_converted_shard_with_flipped_bytes_is_converted_again(tmp_path, base_dir):
    source = tmp_path / "src"
    source.mkdir()
    expected = documents(400, seed=7)
    (source / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in expected))
    argv = [sys.executable, "-m", "scripts.download", "--dataset", "mydocs"]
    argv += ["--source", str(source), "--shard-chars", "20000"]
    assert run_cli(argv).returncode == 0
    folder = shards.data_dir(base_dir, "mydocs")
    found = shards.list_shards(folder)
    assert len(found) >= 3
    flip_file(found[1])

    result = run_cli(argv)
    assert result.returncode == 0, result.stderr
    assert f"{found[1]} does not match its recorded sha256" in result.stderr
    assert "already converted" not in result.stdout
    assert list(shards.iter_texts(shards.list_shards(folder))) == expected


def test_embedded_shard_with_flipped_bytes_is_rebuilt(base_dir):
    argv = [sys.executable, "-m", "scripts.download", "--dataset", "embedded"]
    assert run_cli(argv).returncode == 0
    folder = shards.data_dir(base_dir, "embedded")
    first = shards.list_shards(folder)[0]
    whole = first.read_bytes()
    flip_file(first)
    result = run_cli(argv)
    assert result.returncode == 0, result.stderr
    assert "does not match its recorded sha256" in result.stderr
    assert first.read_bytes() == whole  # the build is deterministic


def test_shards_without_records_are_verified_once_and_recorded(hub, good, base_dir):
    folder = shards.data_dir(base_dir, "climbmix")
    folder.mkdir(parents=True)
    for index in (0, VAL):  # as an older version left them: no record file
        (folder / shards.shard_name(index)).write_bytes(good[index])
    (folder / shards.shard_name(1)).write_bytes(flipped(good[1]))
    result = download_from_mirror(hub, good)
    assert result.returncode == 0, result.stderr
    assert (hub.count(0), hub.count(1), hub.count(VAL)) == (0, 1, 0)
    assert "recorded the sha256 of 2 shard(s)" in result.stderr
    records = shards.read_records(folder)
    for index, body in good.items():
        assert records[shards.shard_name(index)]["sha256"] == hashlib.sha256(body).hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def swap_tokens(path: Path, rank_a: int, rank_b: int) -> None:
    """Swap the tokens of two merges lines, ranks left in order: the file still parses,
    every length still agrees with token_bytes.json, but texts encode differently."""
    lines = path.read_bytes().splitlines()
    a, b = lines[rank_a].split(b" "), lines[rank_b].split(b" ")
    lines[rank_a], lines[rank_b] = b" ".join([b[0], a[1]]), b" ".join([a[0], b[1]])
    path.write_bytes(b"\n".join(lines) + b"\n")


def write_checkpoint(base: Path, vocab_size: int) -> None:
    """A one-layer random GPT saved the way the training stages save it."""
    from nanochat.model.gpt import GPTConfig

    config = GPTConfig(
        vocab_size=vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, sequence_len=32
    )
    save_checkpoint(base, tiny_gpt(config), tag="d1")


def tok_eval():
    return run_cli([sys.executable, "-m", "scripts.tok_eval", "--max-chars", "1000"])


def test_swapped_merges_lines_stop_chat_cli_and_tok_eval_with_one_line(base_dir):
    tok = tiny_tokenizer()
    folder = tok.save(tokenizer_dir(base_dir))
    write_checkpoint(base_dir, tok.vocab_size)
    swap_tokens(folder / "merges.tiktoken", ord("a"), ord("e"))

    result = run_cli([sys.executable, "-m", "scripts.chat_cli", "-i", "base", "-p", "the model"])
    assert result.returncode == 1  # it used to answer with the altered encoding and exit 0
    assert result.stdout == ""
    assert_one_error_line(result, "merges.tiktoken", "sha256", "make tokenizer")

    result = tok_eval()
    assert result.returncode == 1
    assert_one_error_line(result, str(folder / "merges.tiktoken"), "make tokenizer")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "damage, words",
    [
        ("json-list", ["tokenizer.json holds a JSON list, not an object"]),
        ("json-object", ["tokenizer.json is not a format-1 tokenizer file"]),
        ("invalid-json", ["tokenizer.json is not valid JSON"]),
        ("wrong-type", ["tokenizer.json: 'vocab_size' is not an integer"]),
        ("truncated-merges", ["merges.tiktoken does not match the size and sha256"]),
        ("truncated-merges-unhashed", ["merges.tiktoken: line"]),
    ],
)
def test_malformed_tokenizer_file_is_one_line(base_dir, damage, words):
    folder = tiny_tokenizer().save(tokenizer_dir(base_dir))
    meta_path, merges = folder / "tokenizer.json", folder / "merges.tiktoken"
    meta = json.loads(meta_path.read_text())
    if damage == "json-list":
        meta_path.write_text("[]")
    elif damage == "json-object":
        meta_path.write_text("{}")
    elif damage == "invalid-json":
        meta_path.write_text(meta_path.read_text()[:-40])
    elif damage == "wrong-type":
        meta_path.write_text(json.dumps({**meta, "vocab_size": "300"}))
    else:
        merges.write_bytes(merges.read_bytes()[:-7])  # cut inside the last line
        if damage == "truncated-merges-unhashed":  # saved before the hashes existed
            meta.pop("files", None), meta.pop("sha256", None)
            meta_path.write_text(json.dumps(meta))
    result = tok_eval()
    assert result.returncode == 1
    assert_one_error_line(result, *words, "make tokenizer")

    with pytest.raises(tokmod.TokenizerError) as caught:  # what every other stage reports
        Tokenizer.load(folder)
    assert "\n" not in str(caught.value) and words[0] in str(caught.value)


def test_tokenizer_json_list_stops_pretraining_with_one_line(base_dir):
    folder = tiny_tokenizer().save(tokenizer_dir(base_dir))
    (folder / "tokenizer.json").write_text("[]")
    result = run_cli([sys.executable, "-m", "scripts.base_train", "--depth=1", "--dataset=x"])
    assert result.returncode == 1  # damaged, not mistyped
    assert_one_error_line(result, "tokenizer.json", "make tokenizer")


def test_pretraining_on_a_flipped_shard_stops_with_one_line(base_dir):
    """The records match (same size), the content does not: the first read says which
    shard, exit 1, and nothing is trained on it."""
    write_corpus(base_dir, documents(240, seed=7))
    first = shards.list_shards(shards.data_dir(base_dir, "toy"))[0]
    first.write_bytes(flipped(first.read_bytes()))
    result = pretrain.train(
        [*pretrain.SMALL, "--num-steps=4", "--eval-every=0", "--core-every=0", "--sample-every=0"]
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert_one_error_line(result, first.name, "make download")  # and no traceback


def test_tokenizer_saved_before_the_hashes_loads_with_one_note(base_dir, capsys):
    tok = tiny_tokenizer()
    folder = tok.save(tokenizer_dir(base_dir))
    meta = json.loads((folder / "tokenizer.json").read_text())
    meta.pop("files", None), meta.pop("sha256", None)  # as an older version saved it
    (folder / "tokenizer.json").write_text(json.dumps(meta, indent=2))
    for _ in range(2):
        assert Tokenizer.load(folder).encode("the model reads") == tok.encode("the model reads")
    err = capsys.readouterr().err
    assert err.count("records no hashes") == 1 and "make tokenizer" in err


# --- Damaged checkpoints and step logs (the trainer's own artifacts) ---------------------


CKPT_RUN = [*pretrain.SMALL, "--num-steps=6", "--eval-every=0", "--core-every=0",
            "--sample-every=0", "--save-every=2"]  # fmt: skip


def test_damaged_checkpoints_never_outrank_or_delete_good_ones(toy):
    """Every checkpoint of a finished run is damaged: the rerun starts over, sets the
    damaged ones aside (nothing deleted), and keeps what it saves; the next run resumes."""
    from nanochat.training import checkpoint

    assert pretrain.train(CKPT_RUN).returncode == 0
    folder = checkpoint.checkpoint_dir(toy, "base", "d2")
    assert checkpoint.steps(folder) == [6, 4]
    for step in (6, 4):
        path = checkpoint.model_file(folder, step)
        path.write_bytes(path.read_bytes()[:1000])  # what a full disk or a bad copy leaves
    first = pretrain.train([*CKPT_RUN, "--stop-at=2"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "moved the damaged checkpoint(s) [6, 4]" in first.stderr
    assert checkpoint.latest(folder).step == 2  # before the fix: deleted as soon as saved
    aside = list((folder.parent / checkpoint.REPLACED).glob("d2-damaged-*"))
    assert len(aside) == 1 and {p.name for p in aside[0].iterdir()} >= {
        "model_000006.pt", "meta_000006.json", "model_000004.pt", "meta_000004.json"}  # fmt: skip
    second = pretrain.train(CKPT_RUN)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from step 2" in second.stderr
    assert checkpoint.steps(folder) == [6, 4]


def test_a_torn_last_line_of_the_step_log_is_dropped_on_resume(toy):
    assert pretrain.train([*CKPT_RUN, "--stop-at=2"]).returncode == 0
    log_path = toy / "logs" / "pretrain-d2.jsonl"
    with open(log_path, "a") as f:
        f.write('{"step": 25, "loss": 3.1')  # a kill or a full disk in the middle of an append
    result = pretrain.train(CKPT_RUN)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dropped 1 torn line(s)" in result.stderr
    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
