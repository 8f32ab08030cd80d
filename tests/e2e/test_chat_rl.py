"""Stage 6, RL on GSM8K: the advantage and loss by hand, which tokens are trained, that a
positive advantage makes a reply likelier, and that a stopped run resumes to exactly the
uninterrupted result (on a model that has memorised four problems, so rewards are mixed)."""

from __future__ import annotations

import json
import signal
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from helpers.builders import chat_tokenizer, save_checkpoint, tiny_gpt

from nanochat.model import gpt
from nanochat.tasks import GSM8K
from nanochat.training import checkpoint
from scripts import chat_rl
from scripts.chat_rl import group_advantages, pass_at_k, policy_loss, rows_for

PROBLEMS = [(2, 3), (4, 1), (3, 3), (1, 6)]


def test_group_advantages_and_the_loss_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    # two rows, three positions; -log p of each target token, 1 where it was sampled
    nll = torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]])
    trained = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    row_adv = torch.tensor([0.5, -0.5])
    # -sum(logp * A) / n = sum(nll * A) / n = ((2 + 4) * 0.5 + (3 + 5) * -0.5) / 4 = -0.25
    assert policy_loss(nll, trained, row_adv, token_count=4).item() == pytest.approx(-0.25)
    outcomes = [[False, True, False], [False, False, False], [True, False, False]]
    assert (pass_at_k(outcomes, 1), pass_at_k(outcomes, 2), pass_at_k(outcomes, 3)) == (1, 2, 2)


def test_rows_train_only_the_sampled_reply_tokens():
    prompt = [1, 10, 11]
    replies, masks = [[20, 21, 22, 23], []], [[1, 0, 0, 1], []]
    (inputs, targets), (empty_in, empty_t) = rows_for(prompt, replies, masks, pad=0)
    assert inputs == [1, 10, 11, 20, 21, 22]  # predicts tokens 10 .. 23
    assert targets == [-1, -1, 20, -1, -1, 23]  # tool output (mask 0) and prompt not trained
    assert (empty_in, empty_t) == ([1, 10], [-1, -1])


def test_a_positive_advantage_makes_the_reply_likelier_and_a_negative_one_less():
    torch.manual_seed(0)
    config = gpt.config_for_depth(2, 64, sequence_len=16)
    inputs = torch.randint(0, 64, (1, 8))
    targets = torch.randint(0, 64, (1, 8))
    targets[0, :3] = -1  # the prompt
    trained = (targets >= 0).float()
    for sign in (1.0, -1.0):
        model = tiny_gpt(config)
        before = model(inputs, targets, loss_reduction="none").sum().item()
        loss = policy_loss(
            model(inputs, targets, loss_reduction="none"), trained, torch.tensor([sign]), 5
        )
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
        after = model(inputs, targets, loss_reduction="none").sum().item()
        assert (after < before) if sign > 0 else (after > before)  # nll = -log p


@pytest.fixture
def memorised(base_dir):
    """GSM8K 'hub' files of four sums and an sft checkpoint that has half learned them."""
    rows = [
        {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>"
         f"{a + b}.\n#### {a + b}"}
        for a, b in PROBLEMS
    ]  # fmt: skip
    for split in ("train", "test"):
        folder = base_dir / "task_data" / "gsm8k" / split
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "0000.parquet")
    tok = chat_tokenizer(base_dir)
    config = gpt.config_for_depth(2, tok.vocab_size, sequence_len=64)
    model = tiny_gpt(config)
    rendered = [
        tok.render_conversation(GSM8K.conversation(r["question"], r["answer"])) for r in rows
    ]
    width = max(len(ids) for ids, _ in rendered)
    inputs = torch.tensor([ids[:-1] + [0] * (width - len(ids)) for ids, _ in rendered])
    targets = torch.tensor(
        [[t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
         + [-1] * (width - len(ids)) for ids, mask in rendered]
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(inputs, targets).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(base_dir, model, "sft", run_config={})
    return base_dir


@pytest.fixture
def handlers():
    """chat_rl installs SIGTERM/SIGINT handlers (save, then stop); put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


RL = ["--tasks=hub", "--num-steps=4", "--prompts-per-step=2", "--samples=4",
      "--max-new-tokens=40", "--eval-every=0", "--eval-problems=2", "--save-every=2",
      "--device-batch=4"]  # fmt: skip


def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(memorised, handlers):
    base = memorised
    assert chat_rl.main([*RL, "--tag=whole"]) == 0
    assert chat_rl.main([*RL, "--tag=split", "--stop-at=2"]) == 0
    assert checkpoint.steps(base / "rl_checkpoints" / "split") == [2]
    assert chat_rl.main([*RL, "--tag=split"]) == 0
    whole = checkpoint.load_model_state(checkpoint.latest(base / "rl_checkpoints" / "whole"))
    split = checkpoint.load_model_state(checkpoint.latest(base / "rl_checkpoints" / "split"))
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    source = checkpoint.load_model_state(checkpoint.latest(base / "sft_checkpoints" / "d2"))
    assert not all(torch.equal(whole[k], source[k]) for k in whole)  # RL did change it

    def log(tag):
        lines = (base / "logs" / f"rl-{tag}.jsonl").read_text().splitlines()
        return [(r["step"], r["reward"], r["loss"]) for r in map(json.loads, lines)]

    assert log("whole") == log("split")
    assert [step for step, _, _ in log("whole")] == [1, 2, 3, 4]
    assert any(reward not in (0.0, 1.0) for _, reward, _ in log("whole"))  # mixed groups
    record = json.loads((base / "report" / "rl.json").read_text())
    assert set(record["metrics"]) == {"pass@1", "pass@4", "mean_reward"}
    assert "GSM8K after: pass@1" in (base / "report" / "rl.md").read_text()


def test_no_sft_checkpoint_is_one_line_and_exit_2(base_dir):
    result = run_cli([sys.executable, "-m", "scripts.chat_rl", "--tasks=embedded"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no sft checkpoint: run make sft first (or --source base|mid)"
    ]


def test_bad_input_is_refused_before_any_work(memorised, handlers):
    """Missing hub data and a reply cap that leaves no room for a prompt: UsageError (one
    line, exit 2 through run_main), and nothing written."""
    from nanochat.common import UsageError

    empty = memorised / "elsewhere"
    (empty / "sft_checkpoints").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(empty))
        missing = r"gsm8k \(train\): no parquet files .*make task-data.*--tasks=embedded"
        with pytest.raises(UsageError, match=missing):
            chat_rl.main(["--tasks=hub"])
    with pytest.raises(UsageError, match="--max-new-tokens 64 leaves no room for a prompt"):
        chat_rl.main(["--tasks=hub", "--max-new-tokens=64"])
    assert not (memorised / "rl_checkpoints").exists()
    assert not (memorised / "report" / "rl.md").exists()
