"""Stage 3: pretrain the base model. ``python -m scripts.base_train --depth=12`` (or torchrun).

The depth dial sets everything else (DESIGN B.3/B.4): width, heads, the horizon (tokens =
ratio x scaling parameters), the total batch (2^19 tokens at d12, growing as D^0.383 with
the data, a power of two), the learning rates (scaled with width and batch) and gradient
accumulation (total batch / (device batch x sequence x processes), which must divide);
the arithmetic lives in nanochat/model/dial.py, so a dry run shows it without torch.

Each step logs step/total, loss, LR multiplier, ms/step, tokens/s, MFU and ETA (a progress
bar too at a terminal); val bits-per-byte every --eval-every steps; checkpoints every
--save-every steps and at the end (nanochat/training/checkpoint.py). A run resumes from its latest
complete checkpoint (--resume=auto, the default; NANOCHAT_RESUME sets the default), and
SIGTERM (preemption) saves a checkpoint and exits with 143 so a retry resumes.
Writes base_checkpoints/<tag>/ and report/pretrain.md (the stage's completion marker).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

from nanochat.common import (
    CliParser,
    UsageError,
    add_resume_argument,
    base_dir,
    log,
    positive_int,
    run_main,
)


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.base_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=positive_int, default=20, help="the size dial (default 20)")
    p.add_argument("--dataset", default="climbmix", help="shards under base_data/<dataset>")
    p.add_argument("--device-batch", type=positive_int, default=32, help="rows per micro-step")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="context length")
    p.add_argument(
        "--total-batch", type=positive_int, help="tokens per optimizer step (default: derived)"
    )
    p.add_argument("--ratio", type=float, default=12.0, help="data tokens per scaling param")
    p.add_argument(
        "--lr-scale",
        type=float,
        default=1.0,
        help="multiply every base LR (tiny CPU batches are far below the recipe's 2^19 tokens)",
    )
    p.add_argument("--num-steps", type=positive_int, help="steps (default: from --ratio)")
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (0 = end)")
    p.add_argument("--eval-batches", type=positive_int, default=20, help="val batches per eval")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N (0 = end)")
    p.add_argument("--core-every", type=int, default=2000, help="CORE every N steps (0 = off)")
    p.add_argument("--core-bundle", choices=("dclm", "embedded"), default="dclm")
    p.add_argument("--core-max-per-task", type=positive_int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="samples every N (0 = off)")
    p.add_argument(
        "--stop-at", type=positive_int, help="stop with a checkpoint after this step (time-boxing)"
    )
    add_resume_argument(p)
    p.add_argument("--tag", help="checkpoint folder name (default d<depth>)")
    p.add_argument("--run", default="dummy", help="wandb run name; dummy = off")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls (H100, torchao)")
    return p


# --- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from nanochat import runtime
    from nanochat.data.shards import data_dir, split_shards
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    base = base_dir()
    try:
        tokenizer = Tokenizer.load(tokenizer_dir(base))
        train_paths, val_path = split_shards(data_dir(base, args.dataset))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{exc} (run `make download` and `make tokenizer` first)") from None
    rt = runtime.start()
    try:
        return train(args, rt, tokenizer, train_paths, val_path, base)
    finally:
        runtime.stop(rt)


def train(args, rt, tokenizer, train_paths, val_path, base: Path) -> int:
    import torch

    from nanochat.data.dataloader import PackedLoader
    from nanochat.evaluation.loss_eval import evaluate_bpb, token_bytes
    from nanochat.model import dial, gpt
    from nanochat.report import write_section
    from nanochat.training import checkpoint, optim, train_loop

    wandb_run = start_wandb(args, rt)  # checked before any work: a missing wandb is bad input
    if args.fp8 and rt.device.type != "cuda":
        raise UsageError("--fp8 needs a CUDA GPU (H100 class); drop it on this machine")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    check_memory(args, tokenizer.vocab_size, rt)
    config = gpt.config_for_depth(args.depth, tokenizer.vocab_size, sequence_len=args.seq_len)
    model = gpt.build_model(config, rt.device)
    scaling = gpt.scaling_params(model)
    the_dial = dial.plan(
        args.depth,
        tokenizer.vocab_size,
        args.seq_len,
        args.device_batch,
        rt.world_size,
        args.ratio,
        args.total_batch,
        args.num_steps,
    )
    if the_dial.scaling != scaling:
        raise RuntimeError(f"dial counts {the_dial.scaling} scaling params, the model {scaling}")
    total_batch, accum, num_steps = the_dial.total_batch, the_dial.accumulation, the_dial.steps
    optimizer = optim.build_optimizer(gpt.param_groups(model), config.n_embd, total_batch)
    for group in optimizer.param_groups:
        group["initial_lr"] *= args.lr_scale
        group["lr"] = group["initial_lr"]
    loader = PackedLoader(
        train_paths,
        tokenizer,
        args.device_batch,
        args.seq_len,
        rt.rank,
        rt.world_size,
        rt.device,
    )
    tag = args.tag or f"d{args.depth}"
    ckpt_dir = checkpoint.checkpoint_dir(base, "base", tag)
    run_config = {
        "depth": args.depth,
        "seq_len": args.seq_len,
        "device_batch": args.device_batch,
        "total_batch": total_batch,
        "num_steps": num_steps,
        "dataset": args.dataset,
        "world_size": rt.world_size,
        "lr_scale": args.lr_scale,
    }
    start_step = 0
    found = checkpoint.start_point(ckpt_dir, args.resume, rt.master, rt.barrier, rt.agree)
    if found:
        start_step = resume(found, run_config, model, optimizer, loader, rt)
    bytes_per_token = token_bytes(tokenizer, rt.device)
    flops_per_token = gpt.flops_per_token(config)
    peak = rt.peak_flops()
    bundle = None
    if args.core_every and num_steps >= args.core_every:
        bundle = core_bundle(args, base, rt)
    if args.fp8:
        use_fp8(model)
    forward = model
    if args.compile == "on" or (args.compile == "auto" and rt.device.type == "cuda"):
        forward = torch.compile(model)
    stop = train_loop.Stop()
    if rt.master:
        for line in the_dial.describe():
            log(line)
        log(
            f"pretrain d{args.depth}: accumulation {accum}, {rt.world_size} process(es), "
            f"{rt.dtype} on {rt.device.type}, from step {start_step}"
        )

    def val_bpb() -> float:
        val = PackedLoader([val_path], tokenizer, args.device_batch, args.seq_len,
                           rt.rank, rt.world_size, rt.device)  # fmt: skip
        model.eval()
        with rt.autocast():
            result = evaluate_bpb(forward, iter(val), args.eval_batches, bytes_per_token)
        model.train()
        return result

    def periodic(step: int) -> None:
        """CORE and samples when due (rank 0 prints; every rank evaluates its share)."""
        metrics = {}
        if bundle is not None and step % args.core_every == 0:
            metrics["core"] = run_core(model, tokenizer, bundle, args, rt)
        if args.sample_every and step % args.sample_every == 0 and rt.master:
            print_samples(model, tokenizer, args.seq_len, rt)
        if metrics and rt.master:
            log(f"step {step}: CORE {metrics['core']:.4f}")
            if wandb_run:
                wandb_run.log(metrics, step=step)

    history: list[tuple[int, float]] = []
    log_path = base / "logs" / f"pretrain-{tag}.jsonl"
    if rt.master:
        train_loop.keep_log_until(log_path, start_step)
    bpb = None
    bar = None
    if rt.master and sys.stdout.isatty():  # a progress bar at a terminal, log lines elsewhere
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
    started = time.monotonic()
    step_times: list[float] = []
    step = start_step
    while step < num_steps:
        if args.eval_every and step % args.eval_every == 0 and step > start_step:
            bpb = val_bpb()
            if rt.master:
                log(f"step {step}: val bpb {bpb:.4f}")
                if wandb_run:
                    wandb_run.log({"val_bpb": bpb}, step=step)
        if step > start_step:
            periodic(step)
        t0 = time.monotonic()
        lrm = optim.lr_multiplier(step, num_steps)
        train_loop.set_schedule(optimizer, step, lrm)
        loss_value = train_loop.train_step(forward, model, optimizer, loader, accum, rt)
        step += 1
        history.append((step, loss_value))
        dt = time.monotonic() - t0
        step_times.append(dt)
        if rt.master:
            train_loop.append_step(log_path, step, loss_value, lrm, dt)
            tokens_per_s = total_batch / dt
            mfu = (
                f"{100 * flops_per_token * tokens_per_s / (peak * rt.world_size):.1f}%"
                if peak
                else "n/a"
            )
            recent = sum(step_times[-20:]) / len(step_times[-20:])
            eta = recent * (num_steps - step)
            line = (
                f"loss {loss_value:.4f} | lrm {lrm:.3f} | {dt * 1000:.0f} ms | "
                f"{tokens_per_s:,.0f} tok/s | mfu {mfu} | eta {eta / 60:.1f} min"
            )
            if bar is not None:
                bar.set_postfix_str(line, refresh=False)
                bar.update(1)
            else:
                print(f"step {step:05d}/{num_steps} | {line}", flush=True)
            if wandb_run:
                wandb_run.log(
                    {"loss": loss_value, "lrm": lrm, "tokens_per_s": tokens_per_s}, step=step
                )
        save_now = partial(
            save, ckpt_dir, step, run_config, config, model, optimizer, loader, rt, bpb
        )
        code = train_loop.end_of_step(step, num_steps, args, stop, rt, save_now)
        if code is not None:
            return code
    if bar is not None:
        bar.close()
    bpb = val_bpb()
    seconds = time.monotonic() - started
    if rt.master:
        log(f"done: val bpb {bpb:.4f} after {seconds / 60:.1f} min")
        write_section(
            base,
            "pretrain",
            "Base pretraining",
            {
                "depth": args.depth,
                "parameters": f"{gpt.num_params(model):,}",
                "scaling parameters": f"{scaling:,}",
                "steps": num_steps,
                "tokens per step": total_batch,
                "tokens": f"{num_steps * total_batch:,}",
                "processes": rt.world_size,
                "wall time (this run)": f"{seconds / 60:.1f} min",
                "median step": f"{1000 * sorted(step_times)[len(step_times) // 2]:.0f} ms"
                if step_times
                else "n/a",
                "final val bpb": f"{bpb:.4f}",
                "first / last loss": f"{history[0][1]:.4f} / {history[-1][1]:.4f}"
                if history
                else "n/a",
            },
        )
    return 0


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


def start_wandb(args, rt):
    """A wandb run when --run names one (rank 0 only); None for --run=dummy. No wandb or no
    wandb login is bad input, found before any work (wandb would fail later with a trace)."""
    if args.run == "dummy":
        return None
    try:
        import wandb
    except ImportError:
        raise UsageError(
            f"--run={args.run} logs to wandb, which is not installed: "
            "pip install wandb (and set WANDB_API_KEY), or use RUN=dummy"
        ) from None
    if not wandb_logged_in():
        raise UsageError(
            f"--run={args.run} logs to wandb but no WANDB_API_KEY is set (environment or "
            ".env) and wandb is not logged in: set it, or use RUN=dummy"
        )
    return wandb.init(project="nanochat", name=args.run) if rt.master else None


def use_fp8(model) -> None:
    """Tensorwise fp8 matmuls for the block linears (torchao), the head stays bf16."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UsageError("--fp8 needs torchao: pip install torchao") from None
    import torch.nn as nn

    def eligible(module, name: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and "lm_head" not in name
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, module_filter_fn=eligible)


def core_bundle(args, base: Path, rt):
    """The CORE bundle, ready before training starts (a missing one is bad input)."""
    from nanochat import runtime
    from nanochat.evaluation import eval_bundle

    error = None
    if rt.master:
        try:
            eval_bundle.ensure(base, args.core_bundle)
        except eval_bundle.BundleError as exc:
            error = str(exc)
    if runtime.all_agree(error is not None, rt):
        raise UsageError(
            f"--core-every needs the CORE bundle: {error or 'rank 0 could not get it'}; "
            "use --core-bundle=embedded offline, or --core-every=0"
        )
    return eval_bundle.load_bundle(eval_bundle.bundle_dir(base, args.core_bundle), args.core_bundle)


def run_core(model, tokenizer, bundle, args, rt) -> float:
    from nanochat.evaluation import core_eval

    model.eval()
    with rt.autocast():
        result = core_eval.evaluate_core(
            model, tokenizer, bundle, rt.device, args.core_max_per_task, max_seq_len=args.seq_len
        )
    model.train()
    return result.core


def print_samples(model, tokenizer, context: int, rt) -> None:
    from scripts.base_eval import SAMPLE_PROMPTS, greedy_completion

    model.eval()
    with rt.autocast():
        for prompt in SAMPLE_PROMPTS[:3]:
            text = greedy_completion(model, tokenizer, prompt, 24, context, rt.device)
            print(f"sample: {prompt}{text!r}", flush=True)
    model.train()


def planned(argv: list[str], processes: int, vocab: int):
    """The dial these flags give (``nanochat.model.dial.Dial``): what a run of this command trains.
    The launcher sizes downloads and prices runs with it (no torch)."""
    from nanochat.model import dial

    args = build_parser().parse_args(argv)
    return dial.plan(
        args.depth, vocab, args.seq_len, args.device_batch, processes, args.ratio,
        args.total_batch, args.num_steps,
    )  # fmt: skip


def explain(argv: list[str], processes: int, base: Path) -> list[str]:
    """What the dial derives for these flags (the launcher's dry run prints it; no torch)."""
    from nanochat.model import dial

    meta = base / "tokenizer" / "tokenizer.json"
    vocab, source = dial.DEFAULT_VOCAB, "assumed: no tokenizer yet"
    if meta.is_file():
        vocab, source = json.loads(meta.read_text())["vocab_size"], "from tokenizer.json"
    try:
        the_dial = planned(argv, processes, vocab)
    except UsageError as exc:
        return [f"warning: {exc}"]
    return [*the_dial.describe(), f"vocab {vocab:,} {source}"]


def check_memory(args, vocab_size: int, rt) -> None:
    """Refuse, before allocating anything, a model that cannot train in this machine's
    memory even without activations (DEPTH=99999 would otherwise try to allocate ~100 GB
    and die in a traceback)."""
    from nanochat.common import human_bytes
    from nanochat.model import dial

    have = rt.memory_bytes()
    need = dial.least_training_bytes(args.depth, vocab_size, args.device_batch, args.seq_len)
    if rt.agree(have is not None and need > have):  # every rank stops, or none
        where = "per GPU" if rt.device.type == "cuda" else "available per process"
        raise UsageError(
            f"depth {args.depth} needs at least {human_bytes(need)} to train "
            f"({dial.total_params(args.depth, vocab_size) / 1e6:,.0f}M parameters with their "
            f"gradients and optimizer state), and this machine has "
            f"{human_bytes(have) if have else 'less'} {where}: choose a smaller DEPTH "
            "(or --device-batch)"
        )


def save(ckpt_dir, step, run_config, config, model, optimizer, loader, rt, bpb) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from nanochat.training import checkpoint

    rank_state = {
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
            "python": random.getstate(),
        },
    }
    meta = {
        "model_config": dataclasses.asdict(config),
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
    )
    if rt.master:
        log(f"checkpoint step {step} -> {ckpt_dir}")


def resume(found, run_config, model, optimizer, loader, rt) -> int:
    import torch

    from nanochat.training import checkpoint

    saved = found.meta.get("run_config", {})
    differs = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
    if differs:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differs.items())
        raise UsageError(
            f"the checkpoint in {found.directory} was made with other settings ({what}); "
            "use the same settings, another --tag, or --resume=never to start over"
        )
    model.load_state_dict(checkpoint.load_model_state(found, rt.device))
    state = checkpoint.load_rank_state(found, rt.rank, rt.device)
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] is not None and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), rt.device)
    random.setstate(state["rng"]["python"])
    if rt.master:
        log(f"resuming from step {found.step} ({found.directory})")
    return found.step


if __name__ == "__main__":
    run_main(main)
