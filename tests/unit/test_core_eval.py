"""CORE (nanochat/evaluation/core_eval.py) and stage base-eval (scripts/base_eval.py).

Scoring is checked with hand-built models whose logits know the answer (an oracle) or avoid
it (an anti-oracle); the stage runs end to end on a tiny random GPT with the embedded bundle.
CPU, offline. The bundles themselves (format, download, the embedded one) are in
test_eval_bundle.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers.builders import synthetic_corpus

from nanochat.common import run_main
from nanochat.evaluation import core_eval, eval_bundle
from nanochat.evaluation.eval_bundle import (
    LMExample,
    MCExample,
    SchemaExample,
    TaskSpec,
)
from nanochat.offline import embedded_core
from nanochat.tokenizer import Tokenizer

# A byte-level vocabulary plus a few merges, so that some words are single tokens.
MERGES = [b"ca", b"cat", b" d", b"og", b" dog", b"he", b" t", b" the"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest (and immune to a busy machine's other threads),
    as OMP_NUM_THREADS=1 makes it for real stages (the local backend sets it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer([bytes([b]) for b in range(256)] + MERGES)


def decode_span(tok, prepared, row):
    return tok.decode(prepared.rows[row][prepared.starts[row] : prepared.ends[row]])


# ----------------------------------------------------------------------------- prompts

MC = [
    MCExample("Q: the sky is", ("blue", "green", "loud"), 0),
    MCExample("Q: grass is", ("red", "green"), 1),
    MCExample("Q: snow is", ("white", "black"), 0),
    MCExample("Q: fire is", ("cold", "hot"), 1),
]
SCHEMA = [
    SchemaExample(("The cat sat", "The sky sat"), "on the mat.", 0),
    SchemaExample(("Birds can", "Stones can"), "fly away.", 0),
    SchemaExample(("A fish can", "A dog can"), "bark loudly.", 1),
    SchemaExample(("The sun is", "The moon is"), "hot and bright.", 0),
]
LM = [
    LMExample("Look at  ", "the dog"),
    LMExample("Monday, Tuesday,", "Wednesday"),
    LMExample("a b c d", "e f"),
    LMExample("red, orange,", "yellow"),
]


def test_fewshot_is_fixed_per_example_and_never_the_example_itself():
    for index in range(len(MC)):
        first = core_eval.fewshot_examples(MC, index, 2)
        assert first == core_eval.fewshot_examples(MC, index, 2)  # deterministic
        assert len(first) == 2 and MC[index] not in first
    assert core_eval.fewshot_examples(MC, 0, 0) == []
    assert len(core_eval.fewshot_examples(MC, 0, 10)) == len(MC) - 1  # capped by the pool


def test_render_multiple_choice_with_fewshot_and_delimiter():
    shots = core_eval.fewshot_examples(MC, 0, 2)
    pairs = core_eval.render(MC[0], shots, "\nAnswer: ")
    prefix = "".join(f"{s.query}\nAnswer: {s.choices[s.gold]}\n\n" for s in shots)
    assert [c for c, _ in pairs] == [prefix + "Q: the sky is\nAnswer: "] * 3
    assert [f for _, f in pairs] == [
        prefix + "Q: the sky is\nAnswer: " + choice for choice in ("blue", "green", "loud")
    ]


def test_render_schema_shares_the_continuation():
    pairs = core_eval.render(SCHEMA[0], [SCHEMA[2]], " ")
    shot = "A dog can bark loudly.\n\n"
    assert pairs == [
        (shot + "The cat sat ", shot + "The cat sat on the mat."),
        (shot + "The sky sat ", shot + "The sky sat on the mat."),
    ]


def test_render_language_modelling_trims_the_context():
    pairs = core_eval.render(LM[0], [LM[1]], " ")
    shot = "Monday, Tuesday, Wednesday\n\n"
    assert pairs == [(shot + "Look at ", shot + "Look at the dog")]


# ----------------------------------------------------------------------------- tokens


def test_multiple_choice_continuation_tokens(tok):
    example = MCExample("My pet is a", ("cat", "dog"), 1)
    prepared = core_eval.prepare(tok, example, [], " ")
    assert prepared.rows[0][0] == tok.bos_id
    # " dog" is one token: the delimiter's space belongs to the continuation, not the context
    assert decode_span(tok, prepared, 1) == " dog"
    assert prepared.ends[1] - prepared.starts[1] == 1
    # no " c" token: the space is a token of its own in both rows, so it stays context
    assert decode_span(tok, prepared, 0) == "cat"
    assert tok.decode(prepared.rows[1][1 : prepared.starts[1]]) == "My pet is a"


def test_a_token_merging_across_the_boundary_counts_as_continuation(tok):
    # "ca" + "t" is the single token "cat": the context's last token is absorbed
    example = MCExample("ca", ("t", "r"), 0)
    prepared = core_eval.prepare(tok, example, [], "")
    assert prepared.starts[0] == 1 and decode_span(tok, prepared, 0) == "cat"
    assert decode_span(tok, prepared, 1) == "r"  # "car" is "ca" + "r"


def test_schema_scores_the_same_final_tokens_in_every_row(tok):
    prepared = core_eval.prepare(tok, SCHEMA[0], [], " ")
    spans = [row[s:e] for row, s, e in zip(*asdict(prepared).values(), strict=True)]
    assert spans[0] == spans[1] and tok.decode(spans[0]) == "on the mat."
    # the contexts differ in length, the scored tokens are the rows' last ones
    assert prepared.ends == [len(row) for row in prepared.rows]


def test_language_modelling_continuation_tokens(tok):
    prepared = core_eval.prepare(tok, LM[0], [], " ")
    assert len(prepared.rows) == 1
    assert decode_span(tok, prepared, 0) == " the dog"  # two tokens: " the", " dog"
    assert prepared.ends[0] - prepared.starts[0] == 2
    assert tok.decode(prepared.rows[0][1 : prepared.starts[0]]) == "Look at"


def test_long_rows_are_cropped_from_the_left(tok):
    shots = core_eval.fewshot_examples(LM, 0, 3)
    full = core_eval.prepare(tok, LM[0], shots, " ")
    cropped = core_eval.prepare(tok, LM[0], shots, " ", max_seq_len=12)
    assert len(full.rows[0]) > 12 and len(cropped.rows[0]) == 12
    assert cropped.rows[0] == full.rows[0][-12:]
    assert decode_span(tok, cropped, 0) == decode_span(tok, full, 0) == " the dog"
    # a continuation longer than the window keeps its last tokens, each with a predecessor
    tiny = core_eval.prepare(tok, LM[2], [], " ", max_seq_len=3)
    assert tiny.rows[0] == full_row(tok, LM[2])[-3:] and tiny.starts[0] == 1


def full_row(tok, example):
    return core_eval.prepare(tok, example, [], " ").rows[0]


# ----------------------------------------------------------------------------- scoring


class PrefixModel:
    """Logits from a lookup: after a prefix seen in ``rows``, +boost on the token that
    followed it there (an oracle with boost > 0, an anti-oracle with boost < 0); zeros
    (uniform) after any other prefix. Counts its calls."""

    def __init__(self, rows, vocab_size: int, boost: float):
        self.next = {}
        for row in rows:
            for t in range(1, len(row)):
                self.next[tuple(row[:t])] = row[t]
        self.vocab_size, self.boost, self.calls = vocab_size, boost, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        batch, length = ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        for b in range(batch):
            row = ids[b].tolist()
            for t in range(length):
                token = self.next.get(tuple(row[: t + 1]))
                if token is not None:
                    logits[b, t, token] = self.boost
        return logits


def gold_rows(tok, examples, task: TaskSpec, indices=None):
    rows = []
    for i in range(len(examples)) if indices is None else indices:
        shots = core_eval.fewshot_examples(examples, i, task.num_fewshot)
        prepared = core_eval.prepare(tok, examples[i], shots, task.continuation_delimiter)
        rows.append(prepared.rows[getattr(examples[i], "gold", 0)])
    return rows


TASKS = {
    "multiple_choice": (MC, TaskSpec("mc", "multiple_choice", "mc.jsonl", 2, "\nAnswer: ", 25)),
    "schema": (SCHEMA, TaskSpec("schema", "schema", "schema.jsonl", 1, " ", 50)),
    "language_modeling": (LM, TaskSpec("lm", "language_modeling", "lm.jsonl", 3, " ", 0)),
}


@pytest.mark.parametrize("task_type", list(TASKS))
def test_an_oracle_scores_one_and_an_anti_oracle_zero(tok, task_type):
    examples, task = TASKS[task_type]
    rows = gold_rows(tok, examples, task)
    oracle = PrefixModel(rows, tok.vocab_size, boost=10.0)
    anti = PrefixModel(rows, tok.vocab_size, boost=-10.0)
    assert core_eval.evaluate_task(oracle, tok, examples, task, "cpu") == 1.0
    assert core_eval.evaluate_task(anti, tok, examples, task, "cpu") == 0.0
    assert oracle.calls == len(examples)  # the k options of an example go in one batch


def test_accuracy_counts_each_example(tok):
    examples, task = TASKS["multiple_choice"]
    half = PrefixModel(gold_rows(tok, examples, task, [0, 1]), tok.vocab_size, boost=10.0)
    # examples 2 and 3 see a uniform model: a tie, which goes to the first option
    expected = (2 + sum(examples[i].gold == 0 for i in (2, 3))) / 4
    assert core_eval.evaluate_task(half, tok, examples, task, "cpu") == expected


def test_max_examples_takes_a_fixed_subset(tok):
    examples, task = TASKS["language_modeling"]
    model = PrefixModel([], tok.vocab_size, boost=0.0)
    core_eval.evaluate_task(model, tok, examples, task, "cpu", max_examples=2)
    assert model.calls == 2
    order = core_eval.evaluation_order(100, 10)
    assert order == core_eval.evaluation_order(100, 10) and len(set(order)) == 10
    assert core_eval.evaluation_order(100)[:10] == order  # a prefix of the full order


def test_centered_accuracy_and_core():
    assert core_eval.centered_accuracy(0.25, 25) == 0.0
    assert core_eval.centered_accuracy(1.0, 25) == 1.0
    assert core_eval.centered_accuracy(0.625, 50) == pytest.approx(0.25)
    assert core_eval.centered_accuracy(0.1, 0) == pytest.approx(0.1)  # LM tasks: chance is 0
    assert core_eval.centered_accuracy(0.2, 25) < 0  # below chance
    assert core_eval.core_score([0.5, 0.0, 0.25]) == pytest.approx(0.25)


def write_bundle_folder(root: Path, tasks) -> None:
    """A bundle folder in the official layout from (TaskSpec, examples) pairs."""
    specs = [spec for spec, _ in tasks]
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(eval_bundle.render_core_yaml(specs))
    (root / "eval_meta_data.csv").write_text(eval_bundle.render_meta_csv(specs, {}, {}, "test"))
    for spec, examples in tasks:
        path = root / "eval_data" / spec.dataset_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))


def test_evaluate_core_over_a_bundle(tok, tmp_path):
    write_bundle_folder(tmp_path, [(task, examples) for examples, task in TASKS.values()][::-1])
    bundle = eval_bundle.load_bundle(tmp_path)
    assert [t.label for t in bundle.tasks] == ["lm", "schema", "mc"]
    rows = [r for examples, task in TASKS.values() for r in gold_rows(tok, examples, task)]
    oracle = PrefixModel(rows, tok.vocab_size, boost=10.0)
    seen = []
    result = core_eval.evaluate_core(oracle, tok, bundle, "cpu", on_task=seen.append)
    assert [t.accuracy for t in result.tasks] == [1.0, 1.0, 1.0]
    assert [t.random_baseline for t in result.tasks] == [0.0, 50.0, 25.0]
    assert result.core == 1.0 and len(seen) == 3
    uniform = PrefixModel([], tok.vocab_size, boost=0.0)
    result = core_eval.evaluate_core(uniform, tok, bundle, "cpu", max_per_task=2)
    assert [t.examples for t in result.tasks] == [2, 2, 2]
    assert result.core == pytest.approx(
        sum(core_eval.centered_accuracy(t.accuracy, t.random_baseline) for t in result.tasks) / 3
    )


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    tok = Tokenizer([bytes([b]) for b in range(256)] + MERGES)
    examples, task = TASKS["multiple_choice"]
    model = PrefixModel(gold_rows(tok, examples, task, [0, 1]), tok.vocab_size, boost=10.0)
    accuracy = core_eval.evaluate_task(model, tok, examples, task, "cpu")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps([accuracy, model.calls]))
    dist.destroy_process_group()


def test_two_ranks_split_the_examples_and_agree(tok, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    examples, task = TASKS["multiple_choice"]
    model = PrefixModel(gold_rows(tok, examples, task, [0, 1]), tok.vocab_size, boost=10.0)
    single = core_eval.evaluate_task(model, tok, examples, task, "cpu")
    assert [acc for acc, _ in results] == [single, single]
    assert [calls for _, calls in results] == [2, 2]  # each rank ran half the examples


# ----------------------------------------------------------------------------- the stage


def run_stage(args: list[str], base: Path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scripts.base_eval", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_checkpoint_is_one_line_and_exit_2(base_dir):
    result = run_stage([], base_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "make pretrain" in lines[0], result.stderr
    assert not (base_dir / "report").exists()


@pytest.fixture(scope="module")
def embedded_files():
    """The embedded bundle's files, built from the real embedded corpus."""
    from nanochat.offline import embedded_corpus

    corpus = embedded_corpus.split_corpus(embedded_corpus.build_corpus())
    return embedded_core.build_files(*corpus)


@pytest.fixture
def trained_base(base_dir, embedded_files):
    """BASE_DIR with a byte-level tokenizer, two small shards, the embedded bundle and a
    random depth-2 GPT saved as base_checkpoints/d2 step 5."""
    from helpers.builders import save_checkpoint, tiny_gpt

    from nanochat.data.shards import data_dir, write_shard
    from nanochat.model.gpt import GPTConfig
    from nanochat.tokenizer import tokenizer_dir

    tokenizer = Tokenizer([bytes([b]) for b in range(256)])
    tokenizer.save(tokenizer_dir(base_dir))
    train, val = synthetic_corpus()
    write_shard(data_dir(base_dir, "embedded") / "shard_00000.parquet", train)
    write_shard(data_dir(base_dir, "embedded") / "shard_00001.parquet", val)
    embedded_core.write_bundle(eval_bundle.bundle_dir(base_dir, "embedded"), embedded_files)
    config = GPTConfig(
        tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, sequence_len=128
    )
    run_config = {"dataset": "embedded", "device_batch": 2, "seq_len": 128}
    save_checkpoint(base_dir, tiny_gpt(config), step=5, run_config=run_config)
    return base_dir


def test_base_eval_end_to_end_on_the_embedded_bundle(trained_base, capsys):
    from scripts import base_eval

    code = base_eval.main(["--bundle=embedded", "--max-per-task=20", "--bpb-steps=2"])
    assert code == 0
    rows = list(
        csv.DictReader(io.StringIO((trained_base / "report" / "base-eval-core.csv").read_text()))
    )
    labels = [r["task"] for r in rows]
    assert labels == [
        "sentence_ending",
        "next_word",
        "context_swap",
        "phrase_completion",
        "echo",
        "CORE",
    ]
    assert all(r["examples"] == "20" for r in rows[:-1])
    centered = [float(r["centered"]) for r in rows[:-1]]
    assert float(rows[-1]["centered"]) == pytest.approx(sum(centered) / 5, abs=1e-5)
    report = (trained_base / "report" / "base-eval.md").read_text()
    assert "## Base model evaluation" in report and "d2 step 5" in report
    assert "val bpb" in report and "Greedy samples" in report
    out, err = capsys.readouterr()
    assert "CORE" in out and "inherited dataset embedded" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--step=7"], "no checkpoint of step 7"),
        (["--tag=d9"], "no complete base checkpoint"),
        (["--bundle=dclm", "--source=/nonexistent/eval_bundle.zip"], "--bundle=embedded"),
        (["--bundle=embedded", "--dataset=nothere"], "make download"),
        (["--bundle=embedded", "--source=x.zip"], "the embedded one is built here"),
    ],
)
def test_base_eval_input_errors_are_one_line(trained_base, capsys, args, message):
    from scripts import base_eval

    with pytest.raises(SystemExit) as info:
        run_main(lambda: base_eval.main(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (trained_base / "report").exists()


def test_base_eval_malformed_bundle_data_is_one_line(trained_base, capsys):
    from scripts import base_eval

    data = eval_bundle.bundle_dir(trained_base, "embedded") / "eval_data" / "stdlib" / "echo.jsonl"
    data.write_text('{"context": "no continuation"}\n')
    with pytest.raises(SystemExit) as info:
        run_main(lambda: base_eval.main(["--bundle=embedded", "--max-per-task=2", "--bpb-steps=1"]))
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task echo" in errors[0] and ":1:" in errors[0]
