"""Benchmark one training step: tokens/s, MFU and peak memory at a depth, length and batch.

    python -m scripts.bench_train --depth=20 --seq-len=2048 --device-batch=32   # one GPU
    python -m scripts.bench_train --depth=4 --seq-len=256 --device-batch=8      # CPU, tiny
    make bench ARGS='--depth=12'                                                 # the same

It builds the model and optimizer of scripts.base_train (same code paths: bf16 autocast and
torch.compile on CUDA, fp32 on CPU), feeds random tokens (no data needed), runs a few
warm-up steps (compilation happens there), times the rest and, with --record, appends a row
to docs/benchmarks.md naming the machine. Speed targets live there, never in tests.
Not a stage: a tool beside pretrain (data -> tokenizer -> pretrain -> ...), whose measured
throughput backs the pretrain cost estimate (backends/pricing.py).
"""

from __future__ import annotations

import time
from datetime import date

from nanochat.bench import BENCHMARKS, machine, record
from nanochat.common import CliParser, positive_int, run_main
from nanochat.model.dial import DEFAULT_VOCAB, SEQ_LEN
from nanochat.training import recipe

SECTION = "## Stage 3: pretraining step (scripts.bench_train)"
HEADER = (
    "| date | machine | torch | depth | seq | device batch | dtype | compile | ms/step | "
    "tokens/s | MFU | peak mem |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=positive_int, default=12)
    p.add_argument("--seq-len", type=positive_int, default=SEQ_LEN)
    p.add_argument("--device-batch", type=positive_int, default=32)
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB)
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps (compile)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--record", action="store_true", help="append the row to docs/benchmarks.md")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls (H100, torchao)")
    recipe.add_arguments(p, schedules=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from nanochat import runtime
    from nanochat.model import gpt
    from nanochat.training import optim

    rt = runtime.start()
    config = gpt.config_for_depth(
        args.depth, args.vocab_size, sequence_len=args.seq_len, **recipe.model_options(args)
    )
    model = gpt.build_model(config, rt.device)
    tokens = args.device_batch * args.seq_len
    optimizer = optim.build_optimizer(
        gpt.param_groups(model), config.n_embd, tokens, **recipe.optimizer_options(args)
    )
    if args.fp8:
        from nanochat.model.fp8 import use_fp8

        use_fp8(model)
    compiled = args.compile == "on" or (args.compile == "auto" and rt.device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator(device=rt.device).manual_seed(0)

    def step() -> None:
        ids = torch.randint(
            0, args.vocab_size, (args.device_batch, args.seq_len + 1), generator=gen,
            device=rt.device,
        )  # fmt: skip
        with rt.autocast():
            loss = forward(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = tokens / seconds
    peak = rt.peak_flops()
    flops = gpt.flops_per_token(config)
    mfu = f"{100 * flops * tokens_per_s / peak:.1f}%" if peak else "n/a"
    memory = (
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        if rt.device.type == "cuda"
        else "n/a"
    )
    dtype = str(rt.dtype).removeprefix("torch.") + (" + fp8" if args.fp8 else "")
    windows = "" if args.window_pattern == "L" else f" {args.window_pattern}"
    row = (
        f"| {date.today()} | {machine()} | {torch.__version__} | d{args.depth}{windows} | "
        f"{args.seq_len} | {args.device_batch} | {dtype} | "
        f"{'yes' if compiled else 'no'} | {seconds * 1000:.1f} | {tokens_per_s:,.0f} | {mfu} | "
        f"{memory} |"
    )
    print(
        f"d{args.depth}{windows} seq {args.seq_len} batch {args.device_batch} {dtype}: "
        f"{seconds * 1000:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, MFU {mfu}, "
        f"peak memory {memory}"
    )
    if args.record:
        record(row, SECTION, HEADER)
        print(f"recorded in {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    run_main(main)
