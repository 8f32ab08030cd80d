"""The optimizer: orthogonalization, the Muon and AdamW rules, schedules, and a real 2-process
gloo run that must match one process on the full batch while sharding the optimizer state."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nanochat.training.optim import (
    MuonAdamW,
    base_lrs,
    build_optimizer,
    equalize_rows,
    normuon,
    orthogonalize,
    renormalize,
)
from nanochat.training.schedules import (
    lr_multiplier,
    lr_scale_for_passes,
    muon_momentum,
    weight_decay_multiplier,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _gains_along_input_directions(G: torch.Tensor, Q: torch.Tensor):
    """(sigma_i of G, u_i^T Q v_i): how much Q stretches each of G's singular directions.

    For Q = U p(S) V^T (what the iteration computes) the second item is p(sigma_i)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    gains = torch.diagonal(U.mT @ Q.double() @ Vh.mT, dim1=-2, dim2=-1)
    return S, gains


def _cosine_with_polar_factor(G: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    dot = (Q.double() * polar).sum(dim=(-2, -1))
    return dot / (Q.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))


# ------------------------------------------------------------------------- orthogonalize


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 16, 24)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    # Polar Express after 5 bf16 steps: measured ~[0.85, 1.15] on these shapes. Rectangular
    # Gaussian matrices are well conditioned (smallest/largest sigma > 0.05), so every
    # singular value gets there; [0.6, 1.3] leaves room for bf16 rounding.
    G = _randn(*shape)
    Q = orthogonalize(G)
    assert Q.shape == G.shape and Q.dtype == G.dtype
    sigma = torch.linalg.svdvals(Q.double())
    assert sigma.min() > 0.6 and sigma.max() < 1.3, sigma
    assert (_cosine_with_polar_factor(G, Q) > 0.9).all()


def test_orthogonalize_square_matrix_near_one_except_its_tiniest_directions():
    # A random square matrix has singular values down to ~1e-3 of its largest. Any fixed
    # quintic stretches tiny ones by at most the product of its slopes at 0 (~990 for these
    # five steps), so those stay below 1 -- harmless for Muon, whose update is dominated by
    # the large directions. Everything from 1e-2 of the largest up reaches [0.6, 1.3].
    G = _randn(96, 96, seed=4)
    Q = orthogonalize(G)
    sigma_in, gains = _gains_along_input_directions(G, Q)
    assert sigma_in.min() / sigma_in.max() < 1e-2  # the case this test is about
    assert torch.linalg.svdvals(Q.double()).max() < 1.3
    large = sigma_in >= 1e-2 * sigma_in.max()
    assert gains[large].min() > 0.6 and gains[large].max() < 1.3
    assert _cosine_with_polar_factor(G, Q) > 0.9


def test_orthogonalize_is_shape_consistent():
    """Tall matrices run transposed (same answer as the wide side); a batch == one by one."""
    G = _randn(4, 24, 16)
    assert torch.equal(orthogonalize(G), torch.stack([orthogonalize(g) for g in G]))
    assert torch.equal(orthogonalize(G[0].T), orthogonalize(G[0]).T)
    assert torch.equal(orthogonalize(torch.zeros(5, 3)), torch.zeros(5, 3))  # eps: no NaN


# ------------------------------------------------------------------------- Muon and AdamW


@pytest.mark.parametrize("weight_decay, cautious", [(0.0, True), (0.3, True), (0.3, False)])
def test_muon_two_steps_match_a_hand_computed_reference(weight_decay, cautious):
    p0 = _randn(12, 6, seed=1)
    grads = [_randn(12, 6, seed=2), _randn(12, 6, seed=3)]
    lr, momenta = 0.1, [0.9, 0.8]  # momentum is a group field, re-read every step
    p = p0.clone().requires_grad_()
    opt = MuonAdamW(
        [dict(kind="muon", params=[p], lr=lr, weight_decay=weight_decay, cautious_wd=cautious)]
    )
    expected, buf = p0.clone(), torch.zeros_like(p0)
    for g, beta in zip(grads, momenta, strict=True):
        opt.param_groups[0]["momentum"] = beta
        p.grad = g.clone()
        opt.step()

        buf = beta * buf + (1 - beta) * g
        nesterov = (1 - beta) * g + beta * buf
        scale = math.sqrt(12 / 6)  # tall: both the step and the decay take it
        update = orthogonalize(nesterov) * scale
        mask = (update * expected >= 0).float() if cautious else torch.ones_like(expected)
        expected = expected - lr * scale * weight_decay * mask * expected - lr * update
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)
        assert not torch.equal(p.detach(), p0)


def test_normuon_evens_rows_and_keeps_the_norm_hand_computed():
    # A tall 3x2 matrix: one statistic per row. Mean squares 4.5, 8, 0; from a zero EMA
    # with beta2 0.9 the moments are 0.45, 0.8, 0. Dividing by their roots makes both
    # non-zero rows 3/sqrt(.45) = 4/sqrt(.8) = 4.472 long; rescaling to the old Frobenius
    # norm 5 leaves 5/sqrt(2) = 3.5355 on each.
    U = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    moment = torch.zeros(3, 1)
    out = normuon(U, moment, beta2=0.9)
    torch.testing.assert_close(moment, torch.tensor([[0.45], [0.8], [0.0]]))
    torch.testing.assert_close(
        out, torch.tensor([[3.5355, 0.0], [0.0, 3.5355], [0.0, 0.0]]), atol=1e-4, rtol=0
    )
    # A wide matrix keeps one statistic per column: the transpose gives the transpose.
    moment_t = torch.zeros(1, 3)
    torch.testing.assert_close(normuon(U.T, moment_t, beta2=0.9), out.T)
    torch.testing.assert_close(moment_t, moment.T)


def test_equalize_rows_and_renormalize_hand_computed():
    # Rows of norm 5 and 1 -> both the mean row norm sqrt((25 + 1) / 2) = sqrt(13).
    X = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    expected = torch.tensor([[3.0, 4.0], [5.0, 0.0]]) * math.sqrt(13) / 5
    torch.testing.assert_close(equalize_rows(X), expected)
    # Muon+: Frobenius norm snapped to sqrt(min(2, 3)) = sqrt(2).
    U = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(renormalize(U), U * math.sqrt(2) / 2)


def test_muon_with_every_refinement_matches_the_composed_functions():
    p0 = _randn(12, 6, seed=1)
    grads = [_randn(12, 6, seed=2), _randn(12, 6, seed=3)]
    p = p0.clone().requires_grad_()
    opt = MuonAdamW(
        [dict(kind="muon", params=[p], lr=0.1, momentum=0.9, row_equalize=True,
              renormalize=True, normuon_beta2=0.9)]
    )  # fmt: skip
    expected, buf, moment = p0.clone(), torch.zeros_like(p0), torch.zeros(12, 1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        lookahead = 0.1 * g + 0.9 * buf
        update = normuon(renormalize(orthogonalize(equalize_rows(lookahead))), moment, 0.9)
        expected = expected - 0.1 * update * math.sqrt(12 / 6)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opt.state[p]["second_moment"], moment)


def test_adamw_groups_match_torch_adamw():
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    start = [_randn(5, 7, seed=5), _randn(seed=6)]  # a matrix and a 0-d scalar
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    opt = MuonAdamW([dict(kind="adamw", params=ours, **hyper)])
    reference = torch.optim.AdamW(theirs, **hyper)
    for step in range(3):  # bias correction changes every step
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            a.grad = _randn(*a.shape, seed=100 + 10 * step + i)
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert opt.state[ours[0]]["step"] == 3


def test_muon_adamw_trains_a_two_layer_linear_model():
    x = _randn(256, 8, seed=7)
    teacher = _randn(4, 8, seed=8)
    y = x @ teacher.T + 0.5
    hidden = (0.3 * _randn(16, 8, seed=9)).requires_grad_()
    head = (0.1 * _randn(4, 16, seed=10)).requires_grad_()
    bias = torch.zeros(4, requires_grad=True)
    opt = MuonAdamW(
        [
            dict(kind="muon", params=[hidden], lr=0.05),
            dict(kind="adamw", params=[head], lr=0.02),
            dict(kind="adamw", params=[bias], lr=0.05),
        ]
    )

    def loss_now():
        return F.mse_loss(x @ hidden.T @ head.T + bias, y)

    first = loss_now().item()
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss_now().backward()
        opt.step()
    assert loss_now().item() < 0.5 * first, (first, loss_now().item())


def test_build_optimizer_groups_and_validation():
    matrices = [torch.nn.Parameter(torch.zeros(8, 4)), torch.nn.Parameter(torch.zeros(4, 8))]
    embedding = [torch.nn.Parameter(torch.zeros(10, 4))]
    opt = build_optimizer(
        {"matrices": matrices, "embedding": embedding, "head": [], "scalars": []}, 768, 2**19
    )
    assert [(g["name"], g["kind"], g["initial_lr"]) for g in opt.param_groups] == [
        ("matrices", "muon", 0.02),
        ("embedding", "adamw", 0.3),
    ]
    assert all(g["lr"] == g["initial_lr"] for g in opt.param_groups)
    assert opt.param_groups[1]["betas"] == (0.8, 0.95) and opt.param_groups[1]["eps"] == 1e-10
    assert [g["initial_wd"] for g in opt.param_groups] == [0.0, 0.0]
    assert opt.param_groups[0]["normuon_beta2"] == 0 and not opt.param_groups[0]["row_equalize"]
    head = [torch.nn.Parameter(torch.zeros(3, 4))]
    tuned = build_optimizer(
        {"matrices": matrices, "embedding": embedding, "head": head}, 768, 2**19,
        weight_decay=0.2, normuon=True, muon_eq=True, adam_betas="split",
    )  # fmt: skip
    muon, emb, out = tuned.param_groups
    assert muon["initial_wd"] == muon["weight_decay"] == 0.2 and emb["initial_wd"] == 0.0
    assert muon["normuon_beta2"] == 0.9 and muon["row_equalize"] and muon["renormalize"]
    assert emb["betas"] == (0.8, 0.995) and out["betas"] == (0.8, 0.96)
    with pytest.raises(ValueError, match="adam_betas"):
        build_optimizer({"matrices": matrices}, 768, 2**19, adam_betas="fancy")
    assert opt.world_size == 1 and all(opt.owns(p) for p in matrices + embedding)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_optimizer({"bias": embedding}, 768, 2**19)
    with pytest.raises(ValueError, match="Muon updates matrices"):
        build_optimizer({"matrices": [torch.nn.Parameter(torch.zeros(3))]}, 768, 2**19)
    with pytest.raises(ValueError, match="kind="):
        MuonAdamW([dict(params=matrices)])


# ------------------------------------------------------------------------- schedules


def test_lr_scale_for_passes_divides_a_boost_by_the_square_of_the_passes():
    assert lr_scale_for_passes(4, 0.5) == 4  # less than a pass: as asked
    assert lr_scale_for_passes(4, 1.0) == 4
    assert lr_scale_for_passes(4, 1.0251) == pytest.approx(3.8066, abs=1e-4)  # tiny, 80 steps
    assert lr_scale_for_passes(4, 2.0) == 1
    assert lr_scale_for_passes(4, 3.0753) == pytest.approx(0.4229, abs=1e-4)  # 240 steps
    assert lr_scale_for_passes(1, 3.0) == 1 and lr_scale_for_passes(0.5, 3.0) == 0.5


def test_lr_multiplier_warmup_flat_warmdown():
    total = 1000  # warmdown = last 650 steps: from step 350 to 1000
    assert lr_multiplier(0, total) == pytest.approx(1 / 40)
    assert lr_multiplier(19, total) == pytest.approx(0.5)
    assert lr_multiplier(39, total) == 1.0
    assert lr_multiplier(200, total) == 1.0
    assert lr_multiplier(350, total) == 1.0
    assert lr_multiplier(675, total) == pytest.approx(0.5 * (1 + 0.05))
    assert lr_multiplier(999, total) == pytest.approx(0.05 + 0.95 / 650)
    assert lr_multiplier(1000, total) == pytest.approx(0.05)
    # a run too short for both ramps: inside the warmup, the warmup wins (as upstream)
    assert lr_multiplier(9, 20) == pytest.approx(10 / 40)
    assert lr_multiplier(39, 80) == 1.0  # warmdown began at step 28, warmup still wins
    assert lr_multiplier(40, 80) == pytest.approx(40 / 52 + 12 / 52 * 0.05)


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(5000) == pytest.approx(0.95)


def test_muon_momentum_cycle():
    total = 2000  # warmdown from step 700 to 2000
    assert muon_momentum(0, total, "cycle") == pytest.approx(0.85)
    assert muon_momentum(200, total, "cycle") == pytest.approx(0.91)
    assert muon_momentum(400, total, "cycle") == pytest.approx(0.97)
    assert muon_momentum(700, total, "cycle") == pytest.approx(0.97)
    assert muon_momentum(1350, total, "cycle") == pytest.approx(0.935)
    assert muon_momentum(2000, total, "cycle") == pytest.approx(0.90)
    # a short run: the ramp wins while it lasts
    assert muon_momentum(79, 80, "cycle") == pytest.approx(0.85 + 0.12 * 79 / 400)
    with pytest.raises(ValueError, match="momentum schedule"):
        muon_momentum(0, total, "sawtooth")


def test_weight_decay_multiplier_is_a_cosine_to_zero():
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(100, 100) == pytest.approx(0.0)


def test_base_lrs_scale_with_width_and_batch():
    def lrs(matrices, embedding, head, scalars, gates):
        return {
            "matrices": matrices, "embedding": embedding, "value_embeds": embedding / 2,
            "head": head, "resid_scalars": scalars / 100, "scalars": scalars, "gates": gates,
        }  # fmt: skip

    assert base_lrs(768, 2**19) == pytest.approx(lrs(0.02, 0.3, 0.008, 0.5, 0.2))
    wide = base_lrs(4 * 768, 2**19)  # (width/768)^-0.5 on the embeddings and head only
    assert wide == pytest.approx(lrs(0.02, 0.15, 0.004, 0.5, 0.2))
    big_batch = base_lrs(768, 2**21)  # sqrt(B / 2**19) = 2 on every LR
    assert big_batch == pytest.approx(lrs(0.04, 0.6, 0.016, 1.0, 0.4))


# ------------------------------------------------------------------------- distributed

STEPS, TOTAL_STEPS, BATCH = 3, 4, 16


def make_model():
    """A tiny token model with every group kind: two equally shaped matrices (batched
    orthogonalization), tall and wide ones, an embedding, a head and scalars."""
    shapes = {"m1": (8, 6), "m2": (8, 8), "m3": (8, 8), "m4": (6, 8)}
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(*s, generator=g) * s[1] ** -0.5 for k, s in shapes.items()}
    params["embedding"] = torch.randn(10, 6, generator=g)
    params["head"] = torch.randn(3, 6, generator=g) * 0.3
    params["scale"] = torch.tensor(1.0)
    params["bias"] = torch.zeros(3)
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    groups = {
        "matrices": [params[k] for k in ("m1", "m2", "m3", "m4")],
        "embedding": [params["embedding"]],
        "head": [params["head"]],
        "scalars": [params["scale"], params["bias"]],
    }
    return list(params.values()), groups


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 10, (BATCH,), generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def loss_fn(groups, tokens, targets):
    m1, m2, m3, m4 = groups["matrices"]
    scale, bias = groups["scalars"]
    x = groups["embedding"][0][tokens]
    h = torch.tanh(x @ m1.T)
    h = torch.tanh(h @ m2.T) + h
    h = torch.tanh(h @ m3.T) + h
    x = x + h @ m4.T
    return F.cross_entropy(scale * x @ groups["head"][0].T + bias, targets)


def new_optimizer(groups):
    return build_optimizer(
        groups, width=768, total_batch_tokens=2**19, weight_decay=0.1, normuon=True, muon_eq=True
    )


def train_step(opt, groups, tokens, targets, step):
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier(step, TOTAL_STEPS, warmup_steps=2)
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step, TOTAL_STEPS, "cycle")
    opt.zero_grad(set_to_none=True)
    loss_fn(groups, tokens, targets).backward()
    opt.step()


def snapshot(params):
    return [p.detach().clone() for p in params]


def run_training(rank: int = 0, world_size: int = 1) -> dict:
    """STEPS steps on this rank's slice of the batch, a checkpoint, one more step; then the
    same extra step again from the checkpoint with a fresh optimizer."""
    params, groups = make_model()
    tokens, targets = fixed_batch()
    mine = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    tokens, targets = tokens[mine], targets[mine]
    opt = new_optimizer(groups)
    for step in range(STEPS):
        train_step(opt, groups, tokens, targets, step)
    result = {
        "after": snapshot(params),
        "with_state": [i for i, p in enumerate(params) if opt.state.get(p)],
        "owned": [i for i, p in enumerate(params) if opt.owns(p)],
    }
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)
    train_step(opt, groups, tokens, targets, STEPS)
    result["next"] = snapshot(params)

    with torch.no_grad():
        for p, saved in zip(params, result["after"], strict=True):
            p.copy_(saved)
    resumed = new_optimizer(groups)
    checkpoint.seek(0)
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    train_step(resumed, groups, tokens, targets, STEPS)
    result["next_resumed"] = snapshot(params)
    return result


def distributed_worker(out_dir: str) -> None:
    """Entry point of each torchrun worker (see the test below)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.save(run_training(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    from nanochat import runtime

    runtime.stop(runtime.start())  # barrier, destroy, collect: as every stage ends


WORKER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_optim import distributed_worker
distributed_worker({out!r})
"""


def test_two_gloo_processes_match_one_process_and_shard_the_state(tmp_path):
    from conftest import REPO

    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(WORKER).format(
            repo=str(REPO), tests=str(REPO / "tests" / "unit"), out=str(tmp_path)
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv += [str(script)]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = run_training()
    params, groups = make_model()
    is_muon = [any(p is m for m in groups["matrices"]) for p in params]

    # Both ranks end with identical parameters...
    for key in ("after", "next", "next_resumed"):
        for a, b in zip(ranks[0][key], ranks[1][key], strict=True):
            assert torch.equal(a, b), key
    # ...equal to one process on the full batch (Muon: bf16 orthogonalization, looser).
    for key in ("after", "next"):
        for muon, dist_p, one_p in zip(is_muon, ranks[0][key], single[key], strict=True):
            if muon:
                assert (dist_p - one_p).norm() <= 1e-3 * one_p.norm()
            else:
                torch.testing.assert_close(dist_p, one_p, atol=1e-5, rtol=0)
        moved = [not torch.equal(a, b) for a, b in zip(single[key], snapshot(params), strict=True)]
        assert all(moved), key
    # Each rank keeps state for its own parameters only; together they cover all of them.
    held = [set(r["with_state"]) for r in ranks]
    assert held[0] and held[1] and not held[0] & held[1]
    assert held[0] | held[1] == set(range(len(params)))
    assert [set(r["owned"]) for r in ranks] == held
    assert {i for i in held[0] if is_muon[i]} and {i for i in held[1] if is_muon[i]}
    # A checkpoint (one optimizer file per rank) resumes exactly.
    for r in ranks + [single]:
        for a, b in zip(r["next"], r["next_resumed"], strict=True):
            assert torch.equal(a, b)


def test_state_saved_before_the_new_group_fields_loads_with_their_defaults():
    _, groups = make_model()
    opt = new_optimizer(groups)
    tokens, targets = fixed_batch()
    train_step(opt, groups, tokens, targets, 0)
    old = opt.state_dict()
    for group in old["param_groups"]:  # as written before NorMuon and the decay schedule
        for key in ("normuon_beta2", "row_equalize", "renormalize", "initial_wd"):
            group.pop(key, None)
    fresh = new_optimizer(groups)
    fresh.load_state_dict(old)
    muon = fresh.param_groups[0]
    assert muon["normuon_beta2"] == 0.0 and muon["row_equalize"] is False
    train_step(fresh, groups, tokens, targets, 1)  # and it steps


def test_a_normuon_state_seeds_a_chat_stage_optimizer():
    from nanochat.training.run_state import optimizer_mismatch

    _, groups = make_model()
    opt = new_optimizer(groups)
    tokens, targets = fixed_batch()
    train_step(opt, groups, tokens, targets, 0)
    assert any("second_moment" in state for state in opt.state.values())
    assert optimizer_mismatch(new_optimizer(groups), opt.state_dict()) is None


def test_state_saved_by_another_world_does_not_load():
    _, groups = make_model()
    saved = new_optimizer(groups).state_dict()
    saved["world"] = {"rank": 1, "world_size": 2}
    with pytest.raises(ValueError, match="cannot load"):
        new_optimizer(groups).load_state_dict(saved)
