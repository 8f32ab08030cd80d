"""The pretraining loader: BOS-aligned best-fit rows, disjoint ranks, exact resume; and bpb."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
from helpers.builders import tokenizer_for

from nanochat.data import shards
from nanochat.data.dataloader import EvalRows, PackedLoader, count_tokens, row_groups
from nanochat.evaluation.loss_eval import evaluate_bpb, token_bytes

WORDS = "the model reads packed rows of tokens and learns to predict what comes next".split()


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for i in range(3):  # 3 shards x 4 row groups of 25 documents
        path = folder / shards.shard_name(i)
        shards.write_shard(path, documents(100, seed=i), row_group_size=25)
        paths.append(path)
    tok = tokenizer_for(documents(300, seed=99))
    return paths, tok


def test_rows_start_with_bos_and_shift_by_one(corpus):
    paths, tok = corpus
    loader = PackedLoader(paths, tok, batch_size=4, seq_len=32, buffer_docs=16)
    bos = tok.special_id("<|bos|>")
    for _ in range(5):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, 32)
        assert (inputs[:, 0] == bos).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert int(inputs.min()) >= 0 and int(inputs.max()) < tok.vocab_size


def test_best_fit_fills_rows_with_whole_documents_first(corpus):
    paths, tok = corpus
    whole = {tuple(ids) for ids in tok.encode(list(shards.iter_texts(paths)), prepend="<|bos|>")}
    loader = PackedLoader(paths, tok, batch_size=1, seq_len=256, buffer_docs=32)
    bos = tok.special_id("<|bos|>")
    for _ in range(10):
        row = loader.streams[0].next_row()
        assert len(row) == 257
        starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
        assert starts[0] == 0 and len(starts) >= 3  # several documents per row
        # Every document but the last is whole; only the last may be cropped to fit.
        pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
        assert all(piece in whole for piece in pieces[:-1])
        assert any(doc[: len(pieces[-1])] == pieces[-1] for doc in whole)


def test_ranks_read_disjoint_row_groups(corpus):
    paths, tok = corpus
    everything = row_groups(paths)
    assert len(everything) == 12
    loaders = [PackedLoader(paths, tok, 2, 16, rank=r, world_size=3) for r in range(3)]
    mine = [[g for stream in loader.streams for g in stream.groups] for loader in loaders]
    assert sorted(sum(mine, [])) == sorted(everything)
    assert not set(mine[0]) & set(mine[1])
    assert [loader.my_streams for loader in loaders] == [[0], [1], [2]]


def test_too_many_ranks_is_a_clear_error(corpus):
    paths, tok = corpus
    with pytest.raises(ValueError, match="12 row group\\(s\\) cannot feed 16 ranks"):
        PackedLoader(paths, tok, 2, 16, rank=0, world_size=16)


def take(loader, micro_batches: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(micro_batches)]


def run(corpus, world: int, streams: int, steps: int, state=None) -> tuple[list, list]:
    """``steps`` steps of 4 micro-batches on ``world`` processes over ``streams`` streams
    (from ``state``: every rank's saved positions): each rank's micro-batches, and states."""
    loaders = []
    for r in range(world):
        loader = PackedLoader(*corpus, 2, 16, r, world, buffer_docs=8, accumulation=4 // world)
        loader.deal(streams)
        if state is not None:
            loader.load_shards(state)
        loaders.append(loader)
    rows = [take(loader, steps * 4 // world) for loader in loaders]
    return rows, [loader.state_dict() for loader in loaders]


def step_rows(rows: list[list], world: int, streams: int, step: int) -> list[torch.Tensor]:
    """The micro-batches of one step in the stream order of the run that started on
    ``streams`` processes: stream s's outputs of the step, s = 0 .. streams-1."""
    mine = 4 // world
    by_rank = [r[step * mine : (step + 1) * mine] for r in rows]
    if world <= streams:  # rank r reads streams r, r+W, ... one after another
        per = 4 // streams
        out = {}
        for r, batches in enumerate(by_rank):
            for i, batch in enumerate(batches):
                out[(r + (i // per) * world, i % per)] = batch
        return [out[key] for key in sorted(out)]
    share = world // streams  # ranks r, r+S, ... share stream r % S, taking turns
    out = {}
    for r, batches in enumerate(by_rank):
        for i, batch in enumerate(batches):
            out[(r % streams, i * share + r // streams)] = batch
    return [out[key] for key in sorted(out)]


@pytest.mark.parametrize("start", [1, 2, 4])
@pytest.mark.parametrize("then", [1, 2, 4])
def test_a_position_is_dealt_to_any_process_count_that_fits(corpus, start, then):
    """Started on ``start`` processes (that many streams), 2 steps; resumed on ``then``
    processes for 2 more: the same rows, step for step, as the uninterrupted run."""
    straight, _ = run(corpus, start, start, 4)
    _, saved = run(corpus, start, start, 2)
    resumed, _ = run(corpus, then, start, 2, state=saved)
    for step in range(2):
        want = step_rows(straight, start, start, step + 2)
        got = step_rows(resumed, then, start, step)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_process_count_that_does_not_fit_the_streams_is_refused(corpus):
    paths, tok = corpus
    saved = PackedLoader(paths, tok, 2, 16, rank=0, world_size=2, accumulation=3).state_dict()
    with pytest.raises(ValueError, match="the data has 2 streams .* not 3"):
        PackedLoader(paths, tok, 2, 16, rank=0, world_size=3, accumulation=2).load_shards([saved])


def test_a_position_from_before_the_streams_loads_as_its_ranks_stream(corpus):
    paths, tok = corpus
    old = PackedLoader(paths, tok, 2, 16, rank=1, world_size=2, buffer_docs=8)
    take(old, 3)
    legacy = {"rank": 1, "world_size": 2, **old.streams[0].state_dict()}
    resumed = PackedLoader(paths, tok, 2, 16, rank=1, world_size=2, buffer_docs=8)
    resumed.load_state_dict(legacy)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 3), take(old, 3), strict=True))


def test_resume_gives_exactly_the_uninterrupted_batches(corpus):
    paths, tok = corpus
    straight = PackedLoader(paths, tok, batch_size=3, seq_len=24, buffer_docs=20)
    expected = [straight.next_batch() for _ in range(12)]

    first = PackedLoader(paths, tok, batch_size=3, seq_len=24, buffer_docs=20)
    for _ in range(5):
        first.next_batch()
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)  # the checkpoint's way of storing it
    saved.seek(0)
    resumed = PackedLoader(paths, tok, batch_size=3, seq_len=24, buffer_docs=20)
    resumed.load_state_dict(torch.load(saved))
    for want in expected[5:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_state_of_another_rank_is_refused(corpus):
    paths, tok = corpus
    state = PackedLoader(paths, tok, 2, 16, rank=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match=r"lacks the stream\(s\) \[0\] of rank 0"):
        PackedLoader(paths, tok, 2, 16, rank=0, world_size=2).load_state_dict(state)


def test_epochs_wrap_around(corpus):
    paths, tok = corpus
    loader = PackedLoader(paths[:1], tok, batch_size=8, seq_len=64, buffer_docs=8)
    for _ in range(40):  # 100 documents of ~30 tokens: a few epochs' worth
        loader.next_batch()
    assert loader.epoch >= 2


def test_count_tokens_is_one_pass_of_documents_with_their_bos(corpus):
    paths, tok = corpus
    texts = [
        t for p in paths for rg in range(4) for t in shards.read_texts(shards.open_shard(p), p, rg)
    ]
    want = sum(len(d) for d in tok.encode(texts, prepend="<|bos|>"))
    assert count_tokens(paths, tok) == want
    # with a limit it stops early: more than the limit, less than the whole
    assert 100 < count_tokens(paths, tok, limit=100) < want


class ConstantLoss(torch.nn.Module):
    """Stands in for a model whose per-token loss is exactly ln 2 (one bit per token)."""

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.full(targets.shape, math.log(2))


def test_bits_per_byte_counts_only_tokens_with_bytes(corpus):
    paths, tok = corpus
    per_token = token_bytes(tok)
    assert per_token[tok.special_id("<|bos|>")] == 0
    loader = PackedLoader(paths, tok, batch_size=2, seq_len=32)
    targets = [loader.next_batch()[1] for _ in range(3)]
    replay = iter([(t, t) for t in targets])
    bpb = evaluate_bpb(ConstantLoss(), replay, steps=3, bytes_per_token=per_token)
    flat = torch.cat([t.reshape(-1) for t in targets])
    counted = int((per_token[flat] > 0).sum())
    assert bpb == pytest.approx(counted / int(per_token[flat].sum()))
    assert 0 < bpb < 1  # one bit per token, and tokens hold more than one byte on average


def test_eval_rows_score_every_token_once_in_a_fixed_order(corpus):
    paths, tok = corpus
    stream = [t for doc in tok.encode(list(shards.iter_texts(paths[:1])), prepend="<|bos|>")
              for t in doc]  # fmt: skip
    rows = EvalRows(paths[:1], tok, batch_size=4, seq_len=32, max_rows=10_000)
    assert rows.tokens == len(stream) - 1  # the whole shard, nothing more (no epoch wrap)
    targets = torch.cat([t for _, t in rows.batches()]).reshape(-1)
    inputs = torch.cat([i for i, _ in rows.batches()]).reshape(-1)
    scored = targets[targets >= 0]
    assert scored.tolist() == stream[1:]  # each token after the first, once, in order
    assert inputs[targets >= 0].tolist() == stream[:-1]  # each predicted from its predecessor
    # two ranks split the same rows (whole batches, round-robin), nothing twice
    split = [t for r in (0, 1) for _, t in rows.batches(r, 2)]
    assert sorted(torch.cat(split).reshape(-1).tolist()) == sorted(targets.tolist())
    # a cap takes a prefix: the first rows, whatever the cap
    capped = EvalRows(paths[:1], tok, batch_size=4, seq_len=32, max_rows=5)
    assert capped.tokens == 5 * 32
    assert torch.equal(capped.rows, rows.rows[:5])
    assert all(i.shape == (4, 32) for i, _ in capped.batches())  # padded to a whole batch
