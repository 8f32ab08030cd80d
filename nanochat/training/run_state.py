"""A training run's state around the loop: what every trainer does before its first step and
at each checkpoint, written once for pretraining, midtraining, SFT and RL.

- ``start_wandb``: the wandb run of ``--run`` (rank 0), checked before any work;
- ``seed``, ``scale_lrs``, ``compiled``: the same seeding, LR scaling and torch.compile rule
  in every stage;
- ``save`` / ``resume``: a checkpoint holds the model (rank 0), and per rank the optimizer
  shard, the data position (any object with ``state_dict``/``load_state_dict``: a loader, RL's
  prompt order) and the RNG states, so a resumed run continues exactly where it stopped; a
  resume with other settings is refused; a checkpoint of another number of processes is
  re-sharded (``reshard``) when the stage's data position can be dealt again (pretraining);
- ``warm_start``: a fresh chat stage starts from its source checkpoint's optimizer moments
  when they fit.

The loop itself is ``nanochat.training.train_loop``; checkpoint files are
``nanochat.training.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from pathlib import Path

from nanochat.common import UsageError, log, one_line


def wandb_logged_in() -> bool:
    """WANDB_API_KEY set, ``wandb login``'s netrc entry present, or wandb told to work
    without the server (WANDB_MODE=offline/disabled)."""
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        path = os.environ.get("NETRC") or str(Path("~/.netrc").expanduser())
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(run: str, rt):
    """A wandb run when ``run`` names one (rank 0 only); None for "dummy". No wandb or no
    wandb login is bad input, found before any work (wandb would fail later with a trace)."""
    if run == "dummy":
        return None
    try:
        import wandb
    except ImportError:
        raise UsageError(
            f"--run={run} logs to wandb, which is not installed: "
            "pip install wandb (and set WANDB_API_KEY), or use RUN=dummy"
        ) from None
    if not wandb_logged_in():
        raise UsageError(
            f"--run={run} logs to wandb but no WANDB_API_KEY is set (environment or "
            ".env) and wandb is not logged in: set it, or use RUN=dummy"
        )
    return wandb.init(project="nanochat", name=run) if rt.master else None


def seed(value: int) -> None:
    """Seed torch and Python's ``random`` (the model's init and the data order follow)."""
    import torch

    torch.manual_seed(value)
    random.seed(value)


def scale_lrs(optimizer, factor: float) -> None:
    """Multiply every group's initial LR (the schedule's reference) and its current LR."""
    for group in optimizer.param_groups:
        group["initial_lr"] *= factor
        group["lr"] = group["initial_lr"]


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compiled(model, mode: str, rt):
    """``torch.compile(model)`` for ``--compile=on``, or ``auto`` on CUDA; else the model.

    The compiled kernels are cached under BASE_DIR/compile_cache/ (unless
    $TORCHINDUCTOR_CACHE_DIR says elsewhere), so a second run of the same shapes, in a new
    container with the same volume too, loads them in seconds instead of compiling again.
    """
    if mode == "on" or (mode == "auto" and rt.device.type == "cuda"):
        import os

        import torch

        from nanochat.common import base_dir

        os.environ.setdefault(COMPILE_CACHE_ENV, str(base_dir() / "compile_cache"))
        return torch.compile(model)
    return model


def save(ckpt_dir, step, run_config, model, optimizer, position, rt, bpb) -> None:
    """A checkpoint of this step: the model (rank 0), each rank's optimizer shard, data
    ``position`` and RNG states, and the meta (configs, ``val_bpb``)."""
    import torch
    import torch.distributed as dist

    from nanochat.training import checkpoint

    rank_state = {
        "optimizer": optimizer.state_dict(),
        "loader": position.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
            "python": random.getstate(),
        },
    }
    meta = {
        "model_config": dataclasses.asdict(model.config),
        "run_config": run_config,
        "val_bpb": bpb,
    }
    checkpoint.save(
        ckpt_dir,
        step,
        model.state_dict() if rt.master else None,
        rank_state,
        meta,
        rank=rt.rank,
        world_size=rt.world_size,
        barrier=dist.barrier if rt.distributed else (lambda: None),
        agree=rt.agree,
        collect=rt.collect,
    )
    if rt.master:
        log(f"checkpoint step {step} -> {ckpt_dir}")


def resume(found, run_config, model, optimizer, position, rt, legacy=None) -> int:
    """Load a checkpoint saved by ``save`` into the run; its step. A checkpoint made with
    other settings (``run_config`` differs) is refused: resuming it would not continue the
    same run. ``legacy`` fills settings a checkpoint older than them lacks (what it was
    trained with)."""
    import torch

    from nanochat.training import checkpoint

    saved = {**(legacy or {}), **found.meta.get("run_config", {})}
    differs = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
    if differs:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differs.items())
        raise UsageError(
            f"the checkpoint in {found.directory} was made with other settings ({what}); "
            "use the same settings, another --tag, or --resume=never to start over"
        )
    model.load_state_dict(checkpoint.load_model_state(found, rt.device))
    saved_world = found.meta["world_size"]
    if saved_world == rt.world_size:
        state = checkpoint.load_rank_state(found, rt.rank, rt.device)
        try:
            optimizer.load_state_dict(state["optimizer"])
            position.load_state_dict(state["loader"])
        except ValueError as exc:
            raise UsageError(
                f"cannot resume {found.directory} step {found.step}: {exc}; "
                "--resume=never starts over"
            ) from None
    else:
        state = reshard(found, optimizer, position, rt)
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), rt.device)
    random.setstate(state["rng"]["python"])
    if rt.master:
        log(f"resuming from step {found.step} ({found.directory})")
    return found.step


def reshard(found, optimizer, position, rt) -> dict:
    """Resume a checkpoint written by another number of processes: every rank reads every
    rank's file (on the CPU), keeps the optimizer state of the parameters it owns now and
    the data streams it reads now; the RNG states are rank r's (rank 0's for a rank the
    checkpoint lacks), returned as ``{"rng": ...}``. The files are read one at a time, so a
    process holds one rank's state and its own share, never the whole optimizer. A stage
    whose data position cannot be dealt again (no ``load_shards``) is a UsageError."""
    from nanochat.training import checkpoint

    saved_world = found.meta["world_size"]
    if not hasattr(position, "load_shards"):
        raise UsageError(
            f"the checkpoint in {found.directory} was written by {saved_world} process(es) and "
            f"this stage resumes only on as many (this run has {rt.world_size}): use GPUS/NODES "
            "to match, or --resume=never to start over"
        )
    positions, kept = [], {}
    mine = rt.rank if rt.rank < saved_world else 0  # whose RNG states this rank takes

    def optimizer_shards():
        """Each rank's file in turn (on the CPU), its optimizer part handed on and dropped."""
        for r in range(saved_world):
            state = checkpoint.load_rank_state(found, r, "cpu")
            positions.append(state["loader"])
            if r == mine:
                kept["rng"] = state["rng"]
            yield state.pop("optimizer")

    try:
        optimizer.load_shards(optimizer_shards())
        position.load_shards(positions)
    except ValueError as exc:
        raise UsageError(
            f"cannot resume {found.directory} step {found.step}: {exc}; --resume=never starts over"
        ) from None
    if rt.master:
        how = f" ({position.describe_sharing()})" if hasattr(position, "describe_sharing") else ""
        log(
            f"step {found.step} was written by {saved_world} process(es), this run has "
            f"{rt.world_size}: optimizer state and data position re-sharded{how}"
        )
    return kept


def start_or_resume(ckpt_dir, policy, run_config, model, optimizer, position, rt, legacy=None):
    """Take the tag (``checkpoint.start_point``: its run lock and the ``--resume`` policy) and
    resume its checkpoint if there is one: (start step, the checkpoint found or None)."""
    from nanochat.training import checkpoint

    found = checkpoint.start_point(ckpt_dir, policy, rt.master, rt.barrier, rt.agree, rt.collect)
    if not found:
        return 0, None
    return resume(found, run_config, model, optimizer, position, rt, legacy), found


# --- warm start: a chat stage's optimizer from its source checkpoint -------------------------


def optimizer_mismatch(optimizer, saved) -> str | None:
    """Why ``saved`` (one rank's ``MuonAdamW.state_dict()``) cannot seed ``optimizer``, or None
    when it fits: the same rank of the same world, the same groups (name, kind, size) and every
    state tensor shaped like its parameter (NorMuon's factored moment like its row or
    column), owned by this rank."""
    import torch

    from nanochat.training.optim import normuon_state_shape

    if not isinstance(saved, dict) or not {"state", "param_groups"} <= saved.keys():
        return "the source checkpoint holds no optimizer state"
    world = saved.get("world")
    here = {"rank": optimizer.rank, "world_size": optimizer.world_size}
    if world is not None and world != here:
        return f"its optimizer state was saved by {world}, this process is {here}"
    want = [(g.get("name"), g["kind"], len(g["params"])) for g in optimizer.param_groups]
    have = [(g.get("name"), g.get("kind"), len(g.get("params", ()))) for g in saved["param_groups"]]
    if want != have:
        return f"its parameter groups differ ({have} vs {want})"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = [i for g in saved["param_groups"] for i in g["params"]]
    by_index = dict(zip(index, params, strict=True))
    for i, state in saved["state"].items():
        p = by_index.get(i)
        if p is None:
            return f"its optimizer state names parameter {i}, which no group holds"
        if not optimizer.owns(p):
            return "its optimizer shards are owned by other ranks"
        for key, value in state.items():
            shape = p.shape if key != "second_moment" else normuon_state_shape(p.shape)
            if torch.is_tensor(value) and value.ndim and value.shape != shape:
                return (
                    f"its {key} of shape {tuple(value.shape)} does not fit a parameter of "
                    f"shape {tuple(p.shape)}"
                )
    return None


def warm_start(optimizer, source_meta: dict, rt) -> str | None:
    """Load the source checkpoint's optimizer state (Muon momentum buffers, Adam moments and
    step counts) into a fresh ``optimizer``, keeping this stage's group settings (LRs, initial
    LRs, momentum, weight decay): None when it did, else why not (nothing is changed then).
    Every rank loads its own shard, so the source must have been written by as many processes
    as this run has; the ranks agree before any of them loads."""
    from nanochat import runtime
    from nanochat.training import checkpoint

    why = saved = None
    world = source_meta.get("world_size")
    if world != rt.world_size:
        why = f"the source was written by {world} process(es), this run has {rt.world_size}"
    else:
        found = checkpoint.Found(Path(source_meta["directory"]), source_meta["step"], source_meta)
        try:
            state = checkpoint.load_rank_state(found, rt.rank, rt.device, check_hash=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            why = f"its rank {rt.rank} state is unreadable ({one_line(exc)})"
        else:
            saved = state.get("optimizer") if isinstance(state, dict) else None
            why = optimizer_mismatch(optimizer, saved)
    if runtime.all_agree(why is not None, rt):
        return why or "another rank's optimizer state does not fit"
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, fresh in zip(optimizer.param_groups, settings, strict=True):
        group.update(fresh)
    return None
