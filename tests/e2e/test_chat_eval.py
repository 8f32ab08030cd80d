"""Stage chat-eval (scripts/chat_eval.py): the command end to end on a tiny random checkpoint,
the categorical scoring against stand-in models that know (or deny) the answer, the ChatCORE
centering, and one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers.builders import save_checkpoint, tiny_gpt, tokenizer_for, word_texts
from torch import nn

from nanochat.common import UsageError
from nanochat.evaluation import chat_eval as scoring
from nanochat.model.gpt import GPTConfig
from nanochat.tasks import ARC, MMLU, TaskSlice

VOCAB = 300


def make_tokenizer(base: Path | None = None):
    words = "which what is the of a b c d answer letter planet water number".split()
    return tokenizer_for(word_texts(words, 120, shortest=4, spread=7, stride=3), VOCAB, base)


def make_checkpoint(base: Path) -> None:
    """A depth-2 random GPT saved as the base stage saves it, plus its tokenizer."""
    make_tokenizer(base)
    config = GPTConfig(
        vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, sequence_len=256
    )
    save_checkpoint(base, tiny_gpt(config), step=5)


def chat_eval_cli(args: list[str]):
    return run_cli(
        [sys.executable, "-m", "scripts.chat_eval", *args],
        env={"OMP_NUM_THREADS": "1"},
        timeout=120,
    )


# --- the command ----------------------------------------------------------------------------


def test_the_command_writes_the_report_section(base_dir):
    make_checkpoint(base_dir)
    args = ["-i", "base", "-a", "ARC-Easy", "GSM8K", "--max-problems", "8", "--tasks", "embedded"]
    result = chat_eval_cli([*args, "--max-new-tokens", "8"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ARC-Easy: accuracy" in result.stdout
    assert "GSM8K: accuracy" in result.stdout
    assert "ChatCORE" in result.stdout
    assert (base_dir / "report" / "chat-eval-base.md").is_file()
    record = json.loads((base_dir / "report" / "chat-eval-base.json").read_text())
    assert record["stage"] == "chat-eval-base"
    assert set(record["metrics"]) == {"ARC-Easy", "GSM8K", "ChatCORE"}
    assert all(0.0 <= record["metrics"][k] <= 1.0 for k in ("ARC-Easy", "GSM8K"))
    assert "wall_seconds" in record
    assert "(" in record["facts"]["ARC-Easy"] and "/8" in record["facts"]["ARC-Easy"]

    # Under torchrun each rank scores every second problem; the summed counts are the same.
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = run_cli(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.chat_eval", "--",
         *args, "--max-new-tokens", "8"],
        env={"OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    shared = json.loads((base_dir / "report" / "chat-eval-base.json").read_text())
    assert shared["facts"]["processes"] == 2
    for key in ("ARC-Easy", "GSM8K"):
        assert shared["facts"][key].split(",")[0] == record["facts"][key].split(",")[0], key


def test_unknown_task_is_one_line_and_exit_2(base_dir):
    result = chat_eval_cli(["-i", "base", "-a", "NotATask", "--tasks", "embedded"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NotATask" in lines[0] and "ARC-Easy" in lines[0]


def test_missing_checkpoint_is_one_line_and_exit_2(base_dir):
    result = chat_eval_cli(["-i", "sft", "-a", "ARC-Easy", "--tasks", "embedded"])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "checkpoint" in result.stderr or "model" in result.stderr


def test_missing_hub_data_names_the_folder_and_the_offline_option(base_dir):
    with pytest.raises(UsageError) as info:
        scoring.load_tasks(["MMLU"], "hub", None)
    message = str(info.value)
    assert str(base_dir / "task_data" / "mmlu") in message
    assert "--tasks=embedded" in message and "\n" not in message


# --- categorical scoring --------------------------------------------------------------------


class Oracle(nn.Module):
    """Logits that favour (or, ``against=True``, disfavour) the right letter at every prompt's
    last position: the answer comes from a lookup keyed by the prompt tokens."""

    def __init__(self, answers: dict[tuple[int, ...], int], against: bool = False) -> None:
        super().__init__()
        self.answers = answers
        self.against = against
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        logits = torch.zeros(B, T, VOCAB)
        for row in range(B):
            tokens = ids[row].tolist()
            for length in range(T, 0, -1):  # right padding: find this row's real prompt
                answer = self.answers.get(tuple(tokens[:length]))
                if answer is not None:
                    logits[row, length - 1, answer] = -10.0 if self.against else 10.0
                    break
        return logits


def oracle_for(task, tokenizer, against: bool = False) -> Oracle:
    answers = {}
    for i in range(len(task)):
        conversation = task[i]
        prompt = tuple(tokenizer.render_for_completion(conversation))
        (answers[prompt],) = tokenizer.encode(conversation["messages"][-1]["content"])
    return Oracle(answers, against)


@pytest.mark.parametrize("task", [ARC("ARC-Easy"), TaskSlice(MMLU(), 0, 24)], ids=["arc", "mmlu"])
@pytest.mark.parametrize("batch", [1, 5])
def test_an_oracle_scores_1_and_an_anti_oracle_0(task, batch):
    tokenizer = make_tokenizer()
    indices = range(len(task))
    right = scoring.score_categorical(
        oracle_for(task, tokenizer), tokenizer, task, indices, batch, "cpu"
    )
    assert right == (len(task), len(task))
    wrong = scoring.score_categorical(
        oracle_for(task, tokenizer, against=True), tokenizer, task, indices, batch, "cpu"
    )
    assert wrong == (0, len(task))


def test_scoring_reads_only_the_choice_letters():
    """A huge logit on a token that is not a letter changes nothing."""
    tokenizer = make_tokenizer()
    task = TaskSlice(ARC("ARC-Challenge"), 0, 10)
    oracle = oracle_for(task, tokenizer)

    class Distracted(nn.Module):
        def forward(self, ids):
            logits = oracle(ids)
            logits[:, :, tokenizer.encode("Z")[0]] = 1e4
            return logits

    assert scoring.score_categorical(Distracted(), tokenizer, task, range(10), 4, "cpu") == (
        10,
        10,
    )


# --- ChatCORE and task names -----------------------------------------------------------------


def test_chatcore_centers_each_task_on_its_baseline():
    def score(name, eval_type, correct, total=100):
        return scoring.TaskScore(name, eval_type, correct, total, 0.0)

    assert scoring.centered(0.25, 0.25) == 0.0
    assert scoring.centered(1.0, 0.25) == 1.0
    assert scoring.centered(0.625, 0.25) == pytest.approx(0.5)
    scores = [score("ARC-Easy", "categorical", 25), score("GSM8K", "generative", 40)]
    assert scoring.chatcore(scores) == pytest.approx((0.0 + 0.4) / 2)
    scores = [score("MMLU", "categorical", 10), score("HumanEval", "generative", 0)]
    assert scoring.chatcore(scores) == pytest.approx((-0.2 + 0.0) / 2)


def test_task_names_accept_lists_pipes_and_any_case():
    assert scoring.parse_task_names(None) == list(scoring.TASK_NAMES)
    assert scoring.parse_task_names(["arc-easy|GSM8K", "mmlu", "GSM8K"]) == [
        "ARC-Easy",
        "GSM8K",
        "MMLU",
    ]
    with pytest.raises(UsageError, match="unknown task 'ARC'"):
        scoring.parse_task_names(["ARC"])
