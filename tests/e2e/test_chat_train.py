"""Stages 4 and 5 on CPU: midtraining and SFT run, write checkpoints and reports, SFT targets
follow the mask, packed rows start with BOS, both resume bit for bit (after --stop-at or a
SIGTERM), SFT warm-starts from the mid optimizer and logs its ChatCORE subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers.builders import chat_tokenizer, save_checkpoint, tiny_gpt
from helpers.stopping import sigterm_after_step_two

from nanochat import runtime
from nanochat.data.chat_data import PackedConversations, PaddedConversations
from nanochat.model import gpt
from nanochat.tasks import GSM8K, Mixture, SmolTalk, SpellingBee
from nanochat.training import checkpoint, optim
from nanochat.training.run_state import warm_start

COMMON = ["--tasks=embedded", "--device-batch=4", "--seq-len=64", "--eval-batches=1"]


@pytest.fixture
def based(base_dir):
    """A tokenizer and an untrained depth-2 base checkpoint (no pretraining needed)."""
    tok = chat_tokenizer(base_dir)
    config = gpt.config_for_depth(2, tok.vocab_size, sequence_len=64)
    save_checkpoint(base_dir, tiny_gpt(config), run_config={})
    return base_dir


def run(script: str, args: list[str]):
    return run_cli([sys.executable, "-m", f"scripts.{script}", *COMMON, *args],
                   env={"OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip


def losses(base: Path, name: str) -> list[float]:
    path = base / "logs" / f"{name}.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_padded_targets_are_minus_one_exactly_where_the_mask_is_zero():
    tok = chat_tokenizer()
    task = Mixture([SmolTalk(), GSM8K(n=10)])
    loader = PaddedConversations(task, tok, batch_size=4, seq_len=1000)
    for _ in range(3):
        start = loader.walker.cursor
        inputs, targets = loader.next_batch()
        for r in range(4):
            ids, mask = tok.render_conversation(task[start + r], 1001)
            n = len(ids) - 1
            assert inputs[r, :n].tolist() == ids[:-1]
            want = [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
            assert targets[r, :n].tolist() == want
            assert (targets[r, n:] == -1).all()


def test_packed_rows_start_with_bos_and_resume_exactly():
    tok = chat_tokenizer()
    task = Mixture([SmolTalk(), SpellingBee(n=30)])
    loader = PackedConversations(task, tok, batch_size=3, seq_len=48, buffer_size=8)
    loader.next_batch()
    state = loader.state_dict()
    twin = PackedConversations(task, tok, batch_size=3, seq_len=48, buffer_size=8)
    twin.load_state_dict(state)
    for _ in range(20):
        inputs, targets = loader.next_batch()
        assert (inputs[:, 0] == tok.bos_id).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        other, _ = twin.next_batch()
        assert torch.equal(inputs, other)
    assert loader.epoch >= 1  # wrapped around


def test_midtrain_then_sft_write_checkpoints_and_reports(based):
    mid = run("mid_train", ["--num-steps=3", "--eval-every=2"])
    assert mid.returncode == 0, mid.stderr[-2000:]
    # The fixture's base checkpoint has no optimizer state: midtraining says so, starts fresh.
    assert "warm start: off, starting the optimizer fresh: the source checkpoint holds no " \
        "optimizer state" in mid.stderr  # fmt: skip
    mid_found = checkpoint.latest(checkpoint.checkpoint_dir(based, "mid", "d2"))
    assert mid_found.step == 3
    assert (based / "report" / "midtrain.md").is_file()
    assert len(losses(based, "midtrain-d2")) == 3
    sft = run("chat_sft", ["--num-steps=3", "--eval-every=0", "--chatcore-every=2",
                           "--chatcore-problems=2", "--chatcore-max-tokens=4"])  # fmt: skip
    assert sft.returncode == 0, sft.stderr[-2000:]
    found = checkpoint.latest(checkpoint.checkpoint_dir(based, "sft", "d2"))
    assert found.step == 3
    assert found.meta["model_config"]["n_layer"] == 2
    assert (based / "report" / "sft.md").is_file()
    # Warm start: the Adam moments go on from the mid run's 3 steps; the LRs are SFT's own.
    assert "warm start: optimizer moments from" in sft.stderr
    assert found.meta["run_config"]["warm_start"].startswith("optimizer state of ")
    mid_opt = checkpoint.load_rank_state(mid_found, 0)["optimizer"]
    sft_opt = checkpoint.load_rank_state(found, 0)["optimizer"]
    assert {s["step"] for s in sft_opt["state"].values() if "step" in s} == {6}
    for before, after in zip(mid_opt["param_groups"], sft_opt["param_groups"], strict=True):
        assert after["initial_lr"] == pytest.approx(before["initial_lr"] * 0.02)  # --init-lr-frac
    # ChatCORE subset at step 2 and at the end, in the log and in the report's JSON.
    assert "step 2: ChatCORE " in sft.stderr and "step 3: ChatCORE " in sft.stderr
    record = json.loads((based / "report" / "sft.json").read_text())
    metrics = record["metrics"]
    assert metrics["val_loss"] > 0 and metrics["val_bpb"] > 0  # SFT: assistant tokens only
    assert -3.0 <= metrics["chatcore_subset"] <= 1.0  # centered: chance is 0
    names = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K")
    assert all(0.0 <= metrics[f"chatcore_subset/{name}"] <= 1.0 for name in names)
    assert "ChatCORE" not in metrics  # the report card's column comes from chat-eval-sft
    assert record["facts"]["ChatCORE subset"].startswith(f"{metrics['chatcore_subset']:.4f} (")
    assert "(first 2 problems: ARC-Easy " in record["facts"]["ChatCORE subset"]


def test_chat_stages_inherit_context_and_batch_from_their_source(base_dir):
    """No --seq-len or --device-batch: midtraining takes the base run's, and says so; SFT
    takes the mid run's, and a flag overrides it with a line saying so."""
    tok = chat_tokenizer(base_dir)
    config = gpt.config_for_depth(2, tok.vocab_size, sequence_len=64)
    save_checkpoint(base_dir, tiny_gpt(config), run_config={"seq_len": 48, "device_batch": 3})
    plain = ["--tasks=embedded", "--eval-batches=1", "--num-steps=1", "--eval-every=0"]
    mid = run_cli([sys.executable, "-m", "scripts.mid_train", *plain],
                  env={"OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    assert mid.returncode == 0, mid.stderr[-2000:]
    assert "inherited seq_len 48 from the checkpoint" in mid.stderr
    assert "inherited device_batch 3 from the checkpoint" in mid.stderr
    saved = checkpoint.latest(checkpoint.checkpoint_dir(base_dir, "mid", "d2")).meta
    assert (saved["run_config"]["seq_len"], saved["run_config"]["device_batch"]) == (48, 3)
    sft = run_cli([sys.executable, "-m", "scripts.chat_sft", *plain, "--seq-len=32",
                   "--chatcore-every=0"], env={"OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    assert sft.returncode == 0, sft.stderr[-2000:]
    assert "overriding seq_len: 48 (checkpoint) -> 32" in sft.stderr
    assert "inherited device_batch 3 from the checkpoint" in sft.stderr
    run_config = checkpoint.latest(checkpoint.checkpoint_dir(base_dir, "sft", "d2")).meta[
        "run_config"
    ]
    assert (run_config["seq_len"], run_config["device_batch"]) == (32, 3)


def test_warm_start_takes_the_source_moments_and_keeps_the_new_lrs(tmp_path):
    torch.manual_seed(0)
    config = gpt.config_for_depth(2, 300, sequence_len=32)
    model = gpt.build_model(config, "cpu")
    source = optim.build_optimizer(gpt.param_groups(model), config.n_embd, 256)
    ids = torch.randint(0, 300, (2, 16))
    model(ids, ids).backward()
    source.step()
    directory = tmp_path / "mid"
    checkpoint.save(directory, 7, model.state_dict(), {"optimizer": source.state_dict()}, {})
    meta = {**checkpoint.latest(directory).meta, "directory": str(directory)}
    rt = runtime.start()

    fresh = optim.build_optimizer(gpt.param_groups(model), config.n_embd, 1024)
    lrs = [(g["lr"], g["initial_lr"]) for g in fresh.param_groups]
    assert warm_start(fresh, meta, rt) is None
    assert [(g["lr"], g["initial_lr"]) for g in fresh.param_groups] == lrs
    assert lrs[0][1] != source.param_groups[0]["initial_lr"]  # the LRs really differ
    kinds = set()
    for group in fresh.param_groups:
        for p in group["params"]:
            for key, value in source.state[p].items():
                kinds.add(key)
                if torch.is_tensor(value):
                    assert torch.equal(fresh.state[p][key], value)
                    assert fresh.state[p][key] is not value
                else:
                    assert fresh.state[p][key] == value
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= kinds

    deeper = gpt.build_model(gpt.config_for_depth(3, 300, sequence_len=32), "cpu")
    other = optim.build_optimizer(gpt.param_groups(deeper), config.n_embd, 256)
    assert "parameter groups differ" in warm_start(other, meta, rt)
    assert not other.state  # nothing loaded
    bigger_vocab = gpt.build_model(gpt.config_for_depth(2, 400, sequence_len=32), "cpu")
    fresh = optim.build_optimizer(gpt.param_groups(bigger_vocab), config.n_embd, 256)
    assert "does not fit a parameter of shape" in warm_start(fresh, meta, rt)
    assert not fresh.state
    two = {**meta, "world_size": 2}
    fresh = optim.build_optimizer(gpt.param_groups(model), config.n_embd, 256)
    why = warm_start(fresh, two, rt)
    assert why == "the source was written by 2 process(es), this run has 1"
    assert not fresh.state


def test_midtrain_sigterm_then_rerun_matches_an_uninterrupted_run(based):
    args = ["--num-steps=30", "--eval-every=0", "--save-every=0"]
    straight = run("mid_train", [*args, "--tag=a"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    argv = [sys.executable, "-m", "scripts.mid_train", *COMMON, *args, "--tag=b"]
    stopped, _ = sigterm_after_step_two(argv, checkpoint.checkpoint_dir(based, "mid", "b"))
    assert stopped.step < 30
    again = run("mid_train", [*args, "--tag=b"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {stopped.step}" in again.stderr
    assert losses(based, "midtrain-b") == losses(based, "midtrain-a")
    assert len(losses(based, "midtrain-a")) == 30
    a = checkpoint.load_model_state(checkpoint.latest(checkpoint.checkpoint_dir(based, "mid", "a")))
    b = checkpoint.load_model_state(checkpoint.latest(checkpoint.checkpoint_dir(based, "mid", "b")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_resume_matches_an_uninterrupted_run(based):
    args = ["--source=base", "--num-steps=5", "--eval-every=0", "--save-every=0",
            "--chatcore-every=0"]  # fmt: skip
    straight = run("chat_sft", [*args, "--tag=a"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run("chat_sft", [*args, "--tag=b", "--stop-at=2"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped at step 2" in first.stderr
    second = run("chat_sft", [*args, "--tag=b"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from step 2" in second.stderr
    assert losses(based, "sft-b") == losses(based, "sft-a")
    assert len(losses(based, "sft-a")) == 5


def test_sft_from_mid_without_a_mid_checkpoint_is_one_line(based):
    result = run("chat_sft", ["--num-steps=1"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "run make midtrain first (or --source base)" in result.stderr


def test_a_context_longer_than_the_models_is_one_line_before_any_work(based):
    result = run("mid_train", ["--num-steps=1", "--seq-len=65"])  # the model holds 64
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: --seq-len 65 exceeds the model's 64")
    assert not (based / "mid_checkpoints").exists() and not (based / "logs").exists()
