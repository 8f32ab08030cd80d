"""Stage 4: midtrain the base model on conversations. ``python -m scripts.mid_train``.

Starts from the latest complete base checkpoint (``--base-tag`` picks another) and trains on
DESIGN B.7's mixture (SmolTalk, MMLU auxiliary, GSM8K with calculator calls, identity and
spelling conversations; ``--tasks=embedded`` uses the offline miniatures, ``--tasks=hub`` the
real data in BASE_DIR/task_data), packed like pretraining with the loss on every token.
MuonAdamW with the base LRs for this width and batch, times ``--lr-scale`` and
``--init-lr-frac``; the LR is flat, then decays linearly to 0 over the last 20% of the run.
Warm start (``--warm-start=auto``, the default): a fresh run (not resuming its own checkpoint)
loads the source checkpoint's optimizer state -- Muon momentum buffers, Adam moments and step
counts, each rank its own shard -- when it fits (written by as many processes, the same
parameter groups and shapes), then sets this stage's LRs; otherwise one log line says why and
the optimizer starts fresh. The outcome is in run_config["warm_start"] and the report.
Every ``--eval-every`` steps and at the end: the held-out conversations' loss per target token
and bits per byte (special tokens' bytes count neither way, as in pretraining's val bpb).
Logs, checkpoints, resume and SIGTERM (checkpoint, exit 143) work as in base_train: a
``--stop-at``, a kill or a preemption followed by the same command gives the same model as an
uninterrupted run. Writes mid_checkpoints/<tag>/ and report/midtrain.md (the stage's completion
marker). ``common_arguments``, ``Stage`` and ``run_stage`` are shared with scripts.chat_sft.
"""

from __future__ import annotations

import math
import pickle
import random
import time
from functools import partial
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    add_resume_argument,
    base_dir,
    log,
    one_line,
    positive_int,
    run_main,
)

VAL_FRACTION = 0.05
MAX_VAL_ITEMS = 500


def common_arguments(p: CliParser, *, eval_every: int, save_every: int) -> None:
    """The flags midtraining and SFT share."""
    p.add_argument("--device-batch", type=positive_int, default=32, help="rows per micro-step")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every base LR")
    p.add_argument("--num-steps", type=positive_int, help="steps (default: one epoch)")
    p.add_argument("--eval-every", type=int, default=eval_every, help="val eval every N (0=end)")
    p.add_argument("--eval-batches", type=positive_int, default=20, help="val batches per eval")
    p.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N (0=end)")
    p.add_argument("--stop-at", type=positive_int, help="stop with a checkpoint after this step")
    add_resume_argument(p)
    p.add_argument("--tasks", choices=("embedded", "hub"), default="hub", help="task data")
    p.add_argument("--tag", help="checkpoint folder (default: the source checkpoint's tag)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--run", default="dummy", help="wandb run name; dummy = off")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument(
        "--warm-start",
        choices=("auto", "off"),
        default="auto",
        help="auto: a fresh run starts from the source checkpoint's optimizer moments when they "
        "fit (same processes, same parameter shapes); off: a fresh optimizer (default auto)",
    )


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.mid_train", description=__doc__.split("\n\n")[0])
    common_arguments(p, eval_every=150, save_every=500)
    p.add_argument("--seq-len", type=positive_int, default=2048, help="context length")
    p.add_argument(
        "--total-batch", type=positive_int, help="tokens per step (default: one micro-step)"
    )
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="LR fraction to start at")
    p.add_argument("--base-tag", help="base checkpoint tag (default: the most recent)")
    return p


def mid_mixture(source: str, seed: int = 0):
    from nanochat.tasks import GSM8K, MMLU, Identity, Mixture, SmolTalk, SpellingBee

    return Mixture(
        [
            SmolTalk(source=source, split="train"),
            MMLU(subset="auxiliary_train", source=source, split="train"),
            GSM8K(source=source, split="train"),
            Identity(source="embedded"),  # only embedded exists
            SpellingBee(source="embedded"),
        ],
        seed=seed,
    )


def split_val(mixture):
    """(train, val): the first ~5% of the shuffled mixture is held out for the val loss."""
    from nanochat.tasks import TaskSlice

    n_val = max(1, min(MAX_VAL_ITEMS, int(len(mixture) * VAL_FRACTION)))
    if len(mixture) < 2 * n_val:
        raise UsageError(f"the mixture has only {len(mixture)} conversations")
    return TaskSlice(mixture, n_val), TaskSlice(mixture, 0, n_val)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.inference.engine import load_chat_model

    base = base_dir()
    model, tokenizer, meta = load_chat_model(base, "base", "cpu", args.base_tag)
    try:
        train_task, val_task = split_val(mid_mixture(args.tasks))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{exc} (or use --tasks=embedded)") from None
    stage = Stage(
        name="midtrain",
        title="Midtraining",
        kind="mid",
        packed=True,
        warmdown_frac=0.2,
        lr_frac=args.init_lr_frac,
    )
    return run_stage(args, stage, model, tokenizer, meta, train_task, val_task, base)


class Stage:
    """What differs between midtraining and SFT.

    ``extra_eval`` (optional) is an eval run besides the val loss, every ``extra_eval.every``
    steps (0 = never) and at the end: ``extra_eval(model, tokenizer, rt)`` is called on every
    rank with the plain (uncompiled) model in eval mode under ``torch.no_grad`` and returns
    ``(line, facts, metrics)``: a log line, and the facts and metrics of the last call go into
    the report section. SFT's ChatCORE subset is one.
    """

    def __init__(self, name, title, kind, packed, warmdown_frac, lr_frac, extra_eval=None):
        self.name, self.title, self.kind = name, title, kind
        self.packed, self.warmdown_frac, self.lr_frac = packed, warmdown_frac, lr_frac
        self.extra_eval = extra_eval


def optimizer_mismatch(optimizer, saved) -> str | None:
    """Why ``saved`` (one rank's ``MuonAdamW.state_dict()``) cannot seed ``optimizer``, or None
    when it fits: the same rank of the same world, the same groups (name, kind, size) and every
    state tensor shaped like its parameter, owned by this rank."""
    import torch

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
            if torch.is_tensor(value) and value.ndim and value.shape != p.shape:
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
            state = checkpoint.load_rank_state(found, rt.rank, rt.device)
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


def run_stage(args, stage: Stage, model, tokenizer, meta, train_task, val_task, base: Path):
    from nanochat import runtime

    rt = runtime.start()
    try:
        return _train(args, stage, rt, model, tokenizer, meta, train_task, val_task, base)
    finally:
        runtime.stop(rt)


def _loader(stage: Stage, task, tokenizer, args, rt):
    from nanochat.data.chat_data import PackedConversations, PaddedConversations

    cls = PackedConversations if stage.packed else PaddedConversations
    return cls(task, tokenizer, args.device_batch, args.seq_len, rt.rank, rt.world_size, rt.device)


def _train(args, stage, rt, model, tokenizer, meta, train_task, val_task, base: Path) -> int:
    import torch

    from nanochat.evaluation.loss_eval import token_bytes
    from nanochat.model import gpt
    from nanochat.report import write_section
    from nanochat.training import checkpoint, optim, train_loop
    from scripts.base_train import resume, save, start_wandb

    wandb_run = start_wandb(args, rt)  # a missing wandb is bad input: before any work
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = model.to(rt.device)
    model.train()
    config = model.config
    if args.seq_len > config.sequence_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's {config.sequence_len}")
    rows_per_step = args.device_batch * rt.world_size
    if stage.packed:
        micro = rows_per_step * args.seq_len
        total_batch = args.total_batch or micro
        if total_batch % micro:
            raise UsageError(
                f"--total-batch {total_batch} is not a multiple of device batch x seq len x "
                f"processes = {micro}"
            )
        accum = total_batch // micro
        epoch_units = sum(
            len(tokenizer.render_conversation(c, args.seq_len + 1)[0]) for c in train_task
        )
        per_step = total_batch
    else:
        examples = getattr(args, "examples_per_step", None) or rows_per_step
        if examples % rows_per_step:
            raise UsageError(
                f"--examples-per-step {examples} is not a multiple of device batch x "
                f"processes = {rows_per_step}"
            )
        accum = examples // rows_per_step
        total_batch = examples * args.seq_len  # for the LR scaling only
        epoch_units, per_step = len(train_task), examples
    num_steps = args.num_steps or max(1, epoch_units // per_step)
    optimizer = optim.build_optimizer(gpt.param_groups(model), config.n_embd, total_batch)
    for group in optimizer.param_groups:
        group["initial_lr"] *= args.lr_scale * stage.lr_frac
        group["lr"] = group["initial_lr"]
    loader = _loader(stage, train_task, tokenizer, args, rt)
    tag = args.tag or meta["tag"]
    ckpt_dir = checkpoint.checkpoint_dir(base, stage.kind, tag)
    run_config = {
        "init_from": f"{meta['directory']} step {meta['step']}",
        "seq_len": args.seq_len,
        "device_batch": args.device_batch,
        "accumulation": accum,
        "num_steps": num_steps,
        "tasks": args.tasks,
        "world_size": rt.world_size,
        "lr_scale": args.lr_scale,
        "lr_frac": stage.lr_frac,
    }
    start_step = 0
    found = checkpoint.start_point(ckpt_dir, args.resume, rt.master, rt.barrier, rt.agree)
    if found:
        start_step = resume(found, run_config, model, optimizer, loader, rt)
        # Not compared by resume (a resumed run does not warm-start): carried over.
        run_config["warm_start"] = found.meta.get("run_config", {}).get("warm_start", "n/a")
    elif getattr(args, "warm_start", "off") == "auto":
        why = warm_start(optimizer, meta, rt)
        source = f"{meta['directory']} step {meta['step']}"
        run_config["warm_start"] = f"off: {why}" if why else f"optimizer state of {source}"
        if rt.master:
            log(
                f"warm start: off, starting the optimizer fresh: {why}"
                if why
                else f"warm start: optimizer moments from {source}, this stage's LRs"
            )
    else:
        run_config["warm_start"] = "off (--warm-start=off)"
    forward = model
    if args.compile == "on" or (args.compile == "auto" and rt.device.type == "cuda"):
        forward = torch.compile(model)
    stop = train_loop.Stop()
    if rt.master:
        log(
            f"{stage.name} from {run_config['init_from']}: {len(train_task):,} conversations, "
            f"{num_steps} steps, accumulation {accum}, {rt.world_size} process(es), "
            f"{rt.dtype} on {rt.device.type}, from step {start_step}"
        )

    bytes_per_token = token_bytes(tokenizer, rt.device)

    def val_metrics() -> tuple[float, float]:
        """(loss per target token, bits per byte) over --eval-batches held-out batches; the
        bytes of special tokens count neither way (as in pretraining's val bpb)."""
        val = _loader(stage, val_task, tokenizer, args, rt)
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
        with torch.no_grad(), rt.autocast():
            for _ in range(args.eval_batches):
                inputs, targets = val.next_batch()
                nats = forward(inputs, targets, loss_reduction="none").double().reshape(-1)
                flat = targets.reshape(-1)
                nbytes = torch.where(flat >= 0, bytes_per_token[flat.clamp(min=0)], 0)
                sums += torch.stack(
                    [nats.sum(), (flat >= 0).sum(), (nats * (nbytes > 0)).sum(), nbytes.sum()]
                ).double()
        model.train()
        if rt.distributed:
            import torch.distributed as dist

            dist.all_reduce(sums)
        nats_all, tokens, nats_text, text_bytes = sums.tolist()
        return nats_all / max(tokens, 1), nats_text / (math.log(2) * max(text_bytes, 1))

    extra = stage.extra_eval
    extra_facts: dict = {}
    extra_metrics: dict = {}

    def run_extra(at: int) -> None:
        nonlocal extra_facts, extra_metrics
        model.eval()
        with torch.no_grad():
            line, extra_facts, extra_metrics = extra(model, tokenizer, rt)
        model.train()
        if rt.master:
            log(f"step {at}: {line}")
            if wandb_run:
                wandb_run.log(extra_metrics, step=at)

    log_path = base / "logs" / f"{stage.name}-{tag}.jsonl"
    if rt.master:
        train_loop.keep_log_until(log_path, start_step)
    history: list[float] = []
    step_times: list[float] = []
    vloss = vbpb = None
    started = time.monotonic()
    step = start_step
    while step < num_steps:
        if args.eval_every and step % args.eval_every == 0 and step > start_step:
            vloss, vbpb = val_metrics()
            if rt.master:
                log(f"step {step}: val loss {vloss:.4f}, val bpb {vbpb:.4f}")
        if extra and extra.every and step % extra.every == 0 and step > 0:
            run_extra(step)
        t0 = time.monotonic()
        lrm = optim.lr_multiplier(
            step, num_steps, warmup_steps=0, warmdown_frac=stage.warmdown_frac, final_frac=0.0
        )
        train_loop.set_schedule(optimizer, step, lrm)
        loss_value = train_loop.train_step(forward, model, optimizer, loader, accum, rt)
        step += 1
        history.append(loss_value)
        dt = time.monotonic() - t0
        step_times.append(dt)
        if rt.master:
            train_loop.append_step(log_path, step, loss_value, lrm, dt)
            if wandb_run:
                wandb_run.log({"loss": loss_value, "lrm": lrm}, step=step)
            recent = sum(step_times[-20:]) / len(step_times[-20:])
            eta = recent * (num_steps - step)
            print(
                f"step {step:05d}/{num_steps} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
                f"{dt * 1000:.0f} ms | epoch {loader.epoch} | eta {eta / 60:.1f} min",
                flush=True,
            )
        save_now = partial(
            save, ckpt_dir, step, run_config, config, model, optimizer, loader, rt, None
        )
        code = train_loop.end_of_step(step, num_steps, args, stop, rt, save_now)
        if code is not None:
            return code
    vloss, vbpb = val_metrics()
    if extra and extra.every:
        run_extra(step)
    seconds = time.monotonic() - started
    if rt.master:
        log(f"done: val loss {vloss:.4f}, val bpb {vbpb:.4f} after {seconds / 60:.1f} min")
        write_section(
            base,
            stage.name,
            stage.title,
            {
                "from": run_config["init_from"],
                "tasks": f"{args.tasks}: {train_task.name}",
                "conversations": f"{len(train_task):,} (+{len(val_task):,} held out)",
                "steps": num_steps,
                "accumulation": accum,
                "processes": rt.world_size,
                "wall time (this run)": f"{seconds / 60:.1f} min",
                "final val loss": f"{vloss:.4f}",
                "final val bpb": f"{vbpb:.4f}",
                "first / last loss": f"{history[0]:.4f} / {history[-1]:.4f}" if history else "n/a",
                "warm start": run_config["warm_start"],
                **extra_facts,
            },
            metrics={"val_loss": vloss, "val_bpb": vbpb, **extra_metrics},
            wall_seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    run_main(main)
