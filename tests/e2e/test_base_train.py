"""Stage 3 end to end on CPU: it learns, it resumes bit for bit, SIGTERM leaves a checkpoint,
and 2 gloo processes match 1 process with gradient accumulation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_corpus
from helpers.builders import tokenizer_for
from helpers.pretrain import SMALL, train
from helpers.stopping import sigterm_after_step_two

from nanochat.data import shards
from nanochat.training import checkpoint


def losses(base: Path, tag: str) -> list[float]:
    path = base / "logs" / f"pretrain-{tag}.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_loss_falls_below_the_unigram_baseline(base_dir):
    """On the embedded corpus, a few dozen steps beat the best context-free model."""
    from nanochat.data.dataset import ensure_embedded

    folder = ensure_embedded(base_dir)
    train_paths, _ = shards.split_shards(folder)
    texts = list(shards.iter_texts(train_paths))
    tok = tokenizer_for(texts, 1024, base_dir)
    counts = Counter(t for ids in tok.encode(texts[:200], prepend="<|bos|>") for t in ids[1:])
    total = sum(counts.values())
    unigram = -sum(c / total * math.log(c / total) for c in counts.values())  # nats/token
    result = train(
        [
            "--depth=2",
            "--seq-len=128",
            "--device-batch=16",
            "--total-batch=4096",
            "--dataset=embedded",
            "--num-steps=40",
            "--eval-every=0",
            "--eval-batches=2",
            "--save-every=0",
            "--tag=learn",
            "--lr-scale=8",
        ]  # fmt: skip
    )
    assert result.returncode == 0, result.stderr[-2000:]
    curve = losses(base_dir, "learn")
    assert curve[0] > unigram  # starts at ~ln(vocab)
    assert sum(curve[-5:]) / 5 < unigram - 0.3, (curve[-5:], unigram)
    assert (base_dir / "report" / "pretrain.md").is_file()


def test_lr_scale_per_pass_shrinks_the_boost_over_several_passes(toy):
    from nanochat.data.dataloader import count_tokens
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    train_paths, _ = shards.split_shards(shards.data_dir(toy, "toy"))
    count = count_tokens(train_paths, Tokenizer.load(tokenizer_dir(toy)))
    steps = round(3 * count / 512)  # about three passes at 512 tokens a step
    flags = [*SMALL, f"--num-steps={steps}", "--stop-at=1", "--eval-every=0", "--lr-scale=4"]
    result = train([*flags, "--lr-scale-per-pass", "--tag=passes"])
    assert result.returncode == 0, result.stderr[-2000:]
    passes = steps * 512 / count
    scale = 4 / passes**2
    assert f"makes {passes:.2f} passes over its training split, so LRs x {scale:.3g}" in (
        result.stderr
    )
    plain = train([*flags, "--tag=plain"])  # without the flag: x4, as asked, no count
    assert plain.returncode == 0 and "passes over" not in plain.stderr


def test_resume_continues_bit_for_bit(toy):
    straight = train([*SMALL, "--num-steps=6", "--tag=a", "--save-every=0", "--eval-every=0"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = train([*SMALL, "--num-steps=6", "--tag=b", "--stop-at=3", "--eval-every=0"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped at step 3" in first.stderr
    assert checkpoint.latest(checkpoint.checkpoint_dir(toy, "base", "b")).step == 3
    second = train([*SMALL, "--num-steps=6", "--tag=b", "--eval-every=0"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from step 3" in second.stderr
    assert losses(toy, "b") == losses(toy, "a")  # exact floats, all 6 steps


def test_resume_with_other_settings_is_refused(toy):
    assert train([*SMALL, "--num-steps=4", "--stop-at=2", "--eval-every=0"]).returncode == 0
    result = train([*SMALL, "--num-steps=5", "--eval-every=0"])
    assert result.returncode == 2
    assert "made with other settings (num_steps 4 -> 5)" in result.stderr.splitlines()[-1]


def test_sigterm_saves_a_checkpoint_and_exits_143(toy):
    argv = [sys.executable, "-m", "scripts.base_train", *SMALL, "--num-steps=500",
            "--eval-every=0", "--save-every=0"]  # fmt: skip
    found, _ = sigterm_after_step_two(argv, checkpoint.checkpoint_dir(toy, "base", "d2"))
    assert found.step < 500 and checkpoint.load_model_state(found)


def test_two_processes_match_one_with_accumulation(base_dir):
    """Every document identical, so every row is too: 2 ranks x 1 micro-batch and 1 rank x 2
    micro-batches see the same data, and their losses must agree (gradient averaging)."""
    write_corpus(base_dir, ["one two three four five six seven eight nine ten"] * 96, vocab=280)
    common = ["--depth=2", "--seq-len=32", "--device-batch=2", "--total-batch=128",
              "--dataset=toy", "--num-steps=4", "--eval-every=0", "--save-every=0"]  # fmt: skip
    single = train([*common, "--tag=one"])
    assert single.returncode == 0, single.stderr[-2000:]
    assert "accumulation 2, 1 process(es)" in single.stderr
    double = run_cli(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "scripts.base_train",
            "--",
            *common,
            "--tag=two",
        ],  # fmt: skip
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "accumulation 1, 2 process(es)" in double.stderr
    one, two = losses(base_dir, "one"), losses(base_dir, "two")
    assert len(one) == len(two) == 4
    assert one[-1] < one[0]
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_batch_that_does_not_divide_is_one_line(toy):
    result = train(["--depth=2", "--seq-len=64", "--device-batch=3", "--total-batch=512",
                    "--dataset=toy", "--num-steps=2"])  # fmt: skip
    assert result.returncode == 2
    assert "is not a multiple of device batch x sequence x processes" in result.stderr


def test_missing_data_says_which_stage_to_run(base_dir):
    result = train(["--depth=2", "--dataset=nothing"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "make download" in last


def test_tiny_preset_flags_divide():
    from backends.planning import plan

    argv = plan("pretrain", preset="tiny", dry_run=True).command.argv
    assert "--device-batch=16" in argv and "--total-batch=8192" in argv
    assert 8192 % (16 * 256) == 0


@pytest.mark.parametrize("depth,vocab", [(2, 300), (4, 4096), (12, 32768), (20, 65536)])
def test_the_dial_counts_what_the_model_has(depth, vocab):
    from nanochat.model import dial, gpt

    config = gpt.config_for_depth(depth, vocab)
    assert dial.width(depth) == config.n_embd
    assert dial.scaling_params(depth, vocab) == gpt.scaling_params_of(config)
    assert dial.total_params(depth, vocab) == gpt.num_params(gpt.meta_model(config))


def test_the_dial_follows_the_recipe():
    from nanochat.model import dial

    assert dial.derived_total_batch(12, 32768) == 2**19
    assert dial.derived_total_batch(20, 32768) == 2**20
    d20 = dial.plan(20, 32768, 2048, 32, 8)
    assert d20.accumulation == 2 and 5.1e9 < d20.tokens < 5.3e9  # ~5.2B tokens (the recipe)


def test_dry_run_shows_batch_accumulation_and_horizon():
    result = run_cli(["make", "pretrain", "PRESET=speedrun", "DEPTH=12", "GPUS=8", "DRY_RUN=1"])
    assert result.returncode == 0, result.stderr
    notes = result.stderr
    assert "# horizon: 2,520 steps x 524,288 tokens" in notes
    assert "x 8 process(es) x accumulation 1" in notes
    assert "d12: 768 wide" in notes
    # the speedrun says its windows; the defaults' features; the LR as the recipe's
    assert "recipe: windows L," in notes and "features: value_embeds, smear;" in notes
    assert "; LRs x 1\n" in notes


def test_dry_run_of_the_tiny_preset_says_its_lr_rule():
    result = run_cli(["make", "pretrain", "PRESET=tiny", "DRY_RUN=1"])
    assert result.returncode == 0, result.stderr
    assert "recipe: windows SSSL," in result.stderr
    assert "LRs x 4 for one pass over the training split, / passes^2 over more" in result.stderr


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--run=myrun", "--run=myrun logs to wandb but no WANDB_API_KEY is set"),
        ("--fp8", "--fp8 needs a CUDA GPU"),
    ],
)
def test_optional_features_missing_here_are_one_line(toy, tmp_path, flag, message):
    # No wandb login (no key, an empty netrc) and no GPU here: both are bad input.
    result = train([*SMALL, "--num-steps=2", flag], env={"NETRC": str(tmp_path / "no-netrc")})
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (toy / "base_checkpoints").exists()  # nothing was trained or written


def test_core_and_samples_during_training(toy):
    flags = ["--num-steps=3", "--eval-every=0", "--core-every=2", "--core-bundle=embedded"]
    result = train([*SMALL, *flags, "--core-max-per-task=5", "--sample-every=2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2: CORE " in result.stderr
    assert result.stdout.count("sample: ") == 3


def test_sigkill_then_the_same_command_continues_from_the_last_checkpoint(toy):
    """No chance to clean up: the rerun still starts from the last complete checkpoint."""
    argv = [*SMALL, "--num-steps=300", "--eval-every=0", "--save-every=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.base_train", *argv],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if "checkpoint step 4 ->" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    saved = checkpoint.latest(checkpoint.checkpoint_dir(toy, "base", "d2")).step
    assert saved >= 4
    again = train([*argv, f"--stop-at={saved + 1}"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {saved}" in again.stderr
    # The log keeps one line per step: the steps run after the checkpoint and lost to the
    # kill were dropped and run again.
    log_lines = (toy / "logs" / "pretrain-d2.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == list(range(1, saved + 2))
