"""The pretraining optimizer: Muon for the block matrices, AdamW for everything else.

Where it fits: ``scripts.base_train`` (and the later chat stages) split the model's parameters
into named groups (``nanochat.model.gpt.param_groups``: ``matrices``, every 2-D weight inside
the transformer blocks, for Muon; ``embedding``, ``value_embeds``, ``head``, ``resid_scalars``,
``scalars`` and ``gates`` for AdamW) and call :func:`build_optimizer`, which returns one
:class:`MuonAdamW` set up with the learning rates of the recipe. Before every step the loop
(``nanochat.training.train_loop``) sets each group's ``lr``, ``weight_decay`` and Muon's
``momentum`` from the schedules (``nanochat.training.schedules``); then it calls
``optimizer.step()``.

* **Muon** (``kind='muon'``): Nesterov momentum, then the update is replaced by the nearest
  semi-orthogonal matrix (:func:`orthogonalize`, a quintic Newton-Schulz iteration in bf16
  with the Polar Express coefficients), scaled by ``sqrt(max(1, rows/cols))``. Three
  optional refinements (group fields, off unless set; facts from upstream nanochat 2026):
  MuonEq row equilibration before the iteration (``row_equalize``), Muon+ renormalisation
  after it (``renormalize``) and NorMuon variance reduction (``normuon_beta2`` > 0).
* **AdamW** (``kind='adamw'``): torch's algorithm (bias-corrected moments, decoupled weight
  decay), written out here so both kinds share the same distributed path.

Distributed (ZeRO-2 style, any backend including gloo): each parameter has one *owner* rank.
``step()`` sums each gradient onto its owner with ``dist.reduce`` and divides by the world
size (so N processes with batch b == one process with batch N*b), the owner alone updates
the parameter and alone keeps its optimizer state, and ``dist.broadcast`` from the owner
gives every rank the same new values. Whole tensors are owned -- Muon needs the whole matrix
to orthogonalize it -- and ownership is dealt greedily to the least-loaded rank in the order
parameters are added, so equally sized matrices go round-robin (rank r: matrices r, r+W,
...). Reduce + broadcast move the same bytes as reduce-scatter + all-gather and need no
padding of uneven shapes. On one process all of this degenerates to plain local updates.
``state_dict()`` holds only this rank's shard: checkpoints save one optimizer file per rank.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.training.recipe import ADAM_BETA_CHOICES

# Polar Express (Amsel et al. 2025, arXiv:2505.16932) per-step (a, b, c) of the quintic
# X <- a X + b (X X^T) X + c (X X^T)^2 X, tuned for 5 steps with a 2% safety margin on the
# normalization (hence NORM_SAFETY); the same table modded-nanogpt and nanochat use.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Beyond the tuned steps: the classical quintic Newton-Schulz polynomial, whose fixed point
# at 1 is superattracting (p(1) = 1, p'(1) = 0), so extra steps only tighten the result.
NEWTON_SCHULZ_QUINTIC = (1.875, -1.25, 0.375)
NORM_SAFETY = 1.02

MUON, ADAMW = "muon", "adamw"
# The model's parameter groups (``nanochat.model.gpt.param_groups``) and who updates them;
# "value_embeds" and "gates" exist only when their model features are on.
GROUP_KINDS = {
    "matrices": MUON,
    "embedding": ADAMW,
    "value_embeds": ADAMW,
    "head": ADAMW,
    "resid_scalars": ADAMW,
    "scalars": ADAMW,
    "gates": ADAMW,
}

# As upstream: base learning rates at d12 (width 768) and a total batch of 2**19 tokens.
REFERENCE_WIDTH = 768
REFERENCE_BATCH_TOKENS = 2**19
MATRIX_LR, EMBEDDING_LR, HEAD_LR, SCALAR_LR = 0.02, 0.3, 0.008, 0.5
GATE_LR = 0.2  # smear and backout (upstream: AdamW at 0.2, no decay)
RESID_LR_FRACTION = 0.01  # resid_lambdas train at 1% of the scalar LR (upstream)
VALUE_EMBED_LR_FRACTION = 0.5  # value embeddings train at half the embedding LR
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
# "split" Adam betas (upstream 2026): the head (0.8, 0.96), the embeddings (0.8, 0.995);
# the other Adam groups keep ADAM_BETAS. "classic": ADAM_BETAS everywhere.
SPLIT_ADAM_BETAS = {"head": (0.8, 0.96), "embedding": (0.8, 0.995), "value_embeds": (0.8, 0.995)}
NORMUON_BETA2 = 0.9


# ----------------------------------------------------------------------------- orthogonalize


def orthogonalize(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately the nearest semi-orthogonal matrix to ``G`` (U V^T of its SVD).

    Works on the last two dimensions, so ``G`` may be batched (..., m, n). The matrix is
    divided by its Frobenius norm (times 1.02, plus ``eps``) so every singular value is
    below 1, cast to bf16, and put through ``steps`` quintic iterations with the Polar
    Express coefficients (:data:`POLAR_EXPRESS_COEFFS`; steps past the fifth use the
    classical Newton-Schulz quintic). Tall matrices are transposed first so the Gram matrix
    X X^T is the small (min(m, n))^2 one. The result is U p(S) V^T, returned in ``G``'s
    dtype. Measured after 5 bf16 steps: p(sigma) within ~[0.85, 1.15] for every sigma above
    ~1e-2 of the largest; tinier ones are stretched by at most the product of the slopes at
    0 (~990), so they may stay below 1 (random square matrices have some).
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix (..., m, n), got shape {tuple(G.shape)}")
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    norm = X.float().norm(dim=(-2, -1), keepdim=True)
    X = (X.float() / (norm * NORM_SAFETY + eps)).bfloat16()
    for step in range(steps):
        a, b, c = quintic_coeffs(step)
        gram = X @ X.mT
        poly = b * gram + c * (gram @ gram)
        X = a * X + poly @ X
    X = X.mT if tall else X
    return X.to(G.dtype)


def quintic_coeffs(step: int) -> tuple[float, float, float]:
    """(a, b, c) of iteration ``step``: Polar Express's table, then the classical quintic."""
    return POLAR_EXPRESS_COEFFS[step] if step < len(POLAR_EXPRESS_COEFFS) else NEWTON_SCHULZ_QUINTIC


def equalize_rows(X: Tensor) -> Tensor:
    """MuonEq (arXiv:2603.28254): every row rescaled to the mean row norm ``||X||_F /
    sqrt(rows)``, so the spectrum entering the iteration is better conditioned. Batched over
    leading dimensions; a zero row stays zero."""
    X32 = X.float()
    target = X32.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))
    rows = X32.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (X32 * (target / rows)).to(X.dtype)


def renormalize(U: Tensor) -> Tensor:
    """Muon+ (arXiv:2602.21545): the Frobenius norm snapped to ``sqrt(min(rows, cols))``,
    that of an exactly semi-orthogonal matrix (corrects an iteration that fell short)."""
    U32 = U.float()
    norm = U32.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (U32 * (math.sqrt(min(U.size(-2), U.size(-1))) / norm)).to(U.dtype)


def normuon_dim(shape: torch.Size) -> int:
    """The dimension NorMuon averages over: the columns of a tall or square matrix (one
    statistic per row), the rows of a wide one (one per column)."""
    return -1 if shape[-2] >= shape[-1] else -2


def normuon(U: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon variance reduction (arXiv:2510.05491), in place on ``second_moment``.

    ``second_moment`` (rows x 1, or 1 x cols for a wide matrix; batched like ``U``) is an
    EMA of the mean square of ``U`` along :func:`normuon_dim`. ``U`` is divided by its square
    root per row (or column) and then rescaled to its own Frobenius norm, so the step's size
    is unchanged and only its spread across neurons is evened out."""
    dim = normuon_dim(U.shape)
    U32 = U.float()
    mean_square = U32.square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(mean_square.to(second_moment.dtype), 1 - beta2)
    scaled = U32 * second_moment.float().clamp_min(1e-10).rsqrt()
    ratio = U32.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True)
    return (scaled * ratio.nan_to_num(0.0)).to(U.dtype)


def normuon_state_shape(shape: torch.Size) -> tuple[int, ...]:
    rows, cols = shape[-2], shape[-1]
    return (rows, 1) if normuon_dim(shape) == -1 else (1, cols)


def muon_scale(shape: torch.Size) -> float:
    """``sqrt(max(1, rows/cols))``: keeps the update's RMS similar for tall matrices."""
    return math.sqrt(max(1.0, shape[-2] / shape[-1]))


# ----------------------------------------------------------------------------- the optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups tagged ``kind='muon'``, AdamW for ``kind='adamw'``, sharded across ranks.

    Each group may set its own ``lr``, ``weight_decay`` and (Muon) ``momentum``, ``ns_steps``,
    ``cautious_wd``, ``row_equalize``, ``renormalize``, ``normuon_beta2`` or (AdamW)
    ``betas``, ``eps``; missing fields take the defaults below.

    Muon step for a matrix p with gradient g (momentum beta):
        m <- beta m + (1 - beta) g                 (EMA momentum buffer)
        u <- (1 - beta) g + beta m                 (Nesterov look-ahead)
        u <- equalize_rows(u)                      (only with ``row_equalize``)
        o <- orthogonalize(u)
        o <- renormalize(o)                        (only with ``renormalize``)
        o <- normuon(o, v, beta2)                  (only with ``normuon_beta2`` > 0)
        s <- sqrt(max(1, rows/cols))
        p <- p - lr s wd mask * p - lr s o         (mask = 1, or with ``cautious_wd`` only
                                                    where o * p >= 0)
    AdamW step: exactly torch.optim.AdamW (bias correction, decoupled decay p *= 1 - lr wd).

    Distributed: see the module docstring. Every rank must call ``step()`` with the same
    parameters in the same order; a missing gradient counts as zeros there so the
    collectives always match (on one process it is skipped, as torch does). After
    ``step()`` the gradients of parameters a rank does not own are not meaningful.
    """

    def __init__(
        self,
        param_groups: Iterable[dict],
        *,
        lr: float = MATRIX_LR,
        momentum: float = 0.95,
        ns_steps: int = 5,
        cautious_wd: bool = True,
        row_equalize: bool = False,
        renormalize: bool = False,
        normuon_beta2: float = 0.0,
        betas: tuple[float, float] = ADAM_BETAS,
        eps: float = ADAM_EPS,
        weight_decay: float = 0.0,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        self._owner: dict[Tensor, int] = {}
        self._load = {MUON: [0] * self.world_size, ADAMW: [0] * self.world_size}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            ns_steps=ns_steps,
            cautious_wd=cautious_wd,
            row_equalize=row_equalize,
            renormalize=renormalize,
            normuon_beta2=normuon_beta2,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        super().__init__(list(param_groups), defaults)

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in (MUON, ADAMW):
            raise ValueError(f"each param group needs kind='muon' or kind='adamw', got {kind!r}")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if kind == MUON and p.ndim < 2:
                raise ValueError(f"Muon updates matrices; got a parameter of shape {p.shape}")
            self._owner[p] = self._assign_owner(kind, p.numel())

    def _assign_owner(self, kind: str, size: int) -> int:
        """The least-loaded rank so far (lowest rank on ties): deterministic on every rank."""
        load = self._load[kind]
        owner = min(range(self.world_size), key=lambda r: load[r])
        load[owner] += size
        return owner

    def owns(self, p: Tensor) -> bool:
        """Whether this rank updates ``p`` and keeps its optimizer state."""
        return self._owner[p] == self.rank

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, params in self._average_gradients_onto_owners():
            if group["kind"] == MUON:
                self._muon_update(group, params)
            else:
                self._adamw_update(group, params)
        self._broadcast_from_owners()
        return loss

    # -- communication

    def _average_gradients_onto_owners(self) -> list[tuple[dict, list[Tensor]]]:
        """Average each gradient onto its owner; the (group, params) this rank must update."""
        pending, owned = [], []
        for group in self.param_groups:
            mine = []
            for p in group["params"]:
                if self.world_size == 1:
                    if p.grad is not None:
                        mine.append(p)
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                owner = self._owner[p]
                pending.append(dist.reduce(p.grad, dst=owner, op=dist.ReduceOp.SUM, async_op=True))
                if owner == self.rank:
                    mine.append(p)
            if mine:
                owned.append((group, mine))
        for work in pending:
            work.wait()
        if self.world_size > 1:
            for _, params in owned:
                for p in params:
                    p.grad.div_(self.world_size)
        return owned

    def _broadcast_from_owners(self) -> None:
        if self.world_size == 1:
            return
        pending = [
            dist.broadcast(p, src=self._owner[p], async_op=True)
            for group in self.param_groups
            for p in group["params"]
        ]
        for work in pending:
            work.wait()

    # -- the two update rules (on this rank's own parameters only)

    def _muon_update(self, group: dict, params: list[Tensor]) -> None:
        beta = group["momentum"]
        lookahead = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)
            lookahead.append(p.grad.lerp(buf, beta))
        # Orthogonalize equally shaped matrices together: one batched iteration per shape.
        by_shape: dict[torch.Size, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[p.shape].append(i)
        beta2 = group["normuon_beta2"]
        for shape, indices in by_shape.items():
            stacked = torch.stack([lookahead[i] for i in indices])
            if group["row_equalize"]:
                stacked = equalize_rows(stacked)
            updates = orthogonalize(stacked, steps=group["ns_steps"])
            if group["renormalize"]:
                updates = renormalize(updates)
            if beta2:
                moments = []
                for i in indices:
                    state = self.state[params[i]]
                    if "second_moment" not in state:
                        state["second_moment"] = params[i].new_zeros(
                            normuon_state_shape(shape), dtype=torch.float32
                        )
                    moments.append(state["second_moment"])
                stacked_moments = torch.stack(moments)
                updates = normuon(updates, stacked_moments, beta2)
                for i, moment in zip(indices, stacked_moments, strict=True):
                    self.state[params[i]]["second_moment"] = moment.clone()
            updates = updates * muon_scale(shape)
            for i, update in zip(indices, updates, strict=True):
                self._apply_muon(params[i], update, group)

    @staticmethod
    def _apply_muon(p: Tensor, update: Tensor, group: dict) -> None:
        """``update`` comes scaled by ``muon_scale``; the decay takes the same scale (as
        upstream: one per-matrix step size for both terms)."""
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            decay = lr * muon_scale(p.shape) * wd
            if group["cautious_wd"]:
                decay = decay * (update * p >= 0).to(p.dtype)
            p.mul_(1 - decay)
        p.sub_(lr * update.to(p.dtype))

    def _adamw_update(self, group: dict, params: list[Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**t
            bias_correction2 = 1 - beta2**t
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    # -- checkpoints: one file per rank

    def state_dict(self) -> dict:
        """torch's optimizer state (this rank's shard only) plus the world it was saved in."""
        saved = super().state_dict()
        saved["world"] = {"rank": self.rank, "world_size": self.world_size}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's shard; it must come from the same rank of the same world size
        (``load_shards`` takes a checkpoint of another world size)."""
        state_dict = dict(state_dict)
        world = state_dict.pop("world", None)
        here = {"rank": self.rank, "world_size": self.world_size}
        if world is not None and world != here:
            raise ValueError(f"optimizer state saved by {world} cannot load into {here}")
        self._restore(state_dict)

    def load_shards(self, shards: Iterable[dict]) -> None:
        """Load the shards every rank of a run on another number of processes saved (one
        at a time: only this rank's part is kept): their states are keyed by the
        parameter's index, the same on every rank, and this rank keeps those of the
        parameters it owns now."""
        mine: dict = {}
        groups = by_index = None
        for shard in shards:
            if groups is None:
                groups = shard["param_groups"]
                params = [p for group in self.param_groups for p in group["params"]]
                index = [i for group in groups for i in group["params"]]
                if len(index) != len(params):
                    raise ValueError(
                        f"optimizer state for {len(index)} parameters, this model has {len(params)}"
                    )
                by_index = dict(zip(index, params, strict=True))
            mine.update({i: st for i, st in shard["state"].items() if self.owns(by_index[i])})
        if groups is None:
            raise ValueError("no optimizer shards to load")
        self._restore({"state": mine, "param_groups": groups})

    def _restore(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # fields newer than the state take their defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)


# ----------------------------------------------------------------------------- building


def base_lrs(width: int, total_batch_tokens: int) -> dict[str, float]:
    """The recipe's base learning rates for a model width and a total batch (in tokens).

    Adam LRs of the embeddings and head scale by (width/768)^-0.5; all LRs by sqrt(B / 2**19).
    """
    batch_scale = math.sqrt(total_batch_tokens / REFERENCE_BATCH_TOKENS)
    width_scale = (width / REFERENCE_WIDTH) ** -0.5
    embedding = EMBEDDING_LR * width_scale * batch_scale
    return {
        "matrices": MATRIX_LR * batch_scale,
        "embedding": embedding,
        "value_embeds": VALUE_EMBED_LR_FRACTION * embedding,
        "head": HEAD_LR * width_scale * batch_scale,
        "resid_scalars": RESID_LR_FRACTION * SCALAR_LR * batch_scale,
        "scalars": SCALAR_LR * batch_scale,
        "gates": GATE_LR * batch_scale,
    }


def build_optimizer(
    groups: dict[str, list[torch.nn.Parameter]],
    width: int,
    total_batch_tokens: int,
    *,
    weight_decay: float = 0.0,
    normuon: bool = False,
    muon_eq: bool = False,
    adam_betas: str = "classic",
) -> MuonAdamW:
    """One MuonAdamW over the named groups of :data:`GROUP_KINDS`.

    Empty groups are left out. Each param group carries ``name``, ``kind``, ``initial_lr``
    (the base LR; the loop sets ``lr = initial_lr * lr_multiplier``) and ``initial_wd``
    (the loop sets ``weight_decay = initial_wd * weight_decay_multiplier``).
    ``weight_decay`` (cautious, decoupled) applies to the Muon matrices only; ``normuon``
    turns on NorMuon (beta2 0.9), ``muon_eq`` MuonEq and Muon+ around the iteration;
    ``adam_betas`` is "classic" or "split" (:data:`SPLIT_ADAM_BETAS`).
    """
    unknown = set(groups) - set(GROUP_KINDS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; use {list(GROUP_KINDS)}")
    if adam_betas not in ADAM_BETA_CHOICES:
        raise ValueError(f"adam_betas must be one of {ADAM_BETA_CHOICES}, got {adam_betas!r}")
    lrs = base_lrs(width, total_batch_tokens)
    param_groups = []
    for name, kind in GROUP_KINDS.items():
        params = list(groups.get(name, []))
        if not params:
            continue
        group = dict(name=name, kind=kind, params=params, lr=lrs[name], initial_lr=lrs[name])
        group["weight_decay"] = group["initial_wd"] = weight_decay if kind == MUON else 0.0
        if kind == MUON:
            group.update(
                normuon_beta2=NORMUON_BETA2 if normuon else 0.0,
                row_equalize=muon_eq,
                renormalize=muon_eq,
            )
        elif adam_betas == "split":
            group["betas"] = SPLIT_ADAM_BETAS.get(name, ADAM_BETAS)
        param_groups.append(group)
    if not param_groups:
        raise ValueError("build_optimizer got no parameters")
    return MuonAdamW(param_groups)
