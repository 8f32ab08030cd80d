"""Benchmark inference: time to first token and decode tokens/s at batch 1 and batch 8.

    python -m scripts.bench_engine                       # the newest checkpoint (auto source)
    python -m scripts.bench_engine --source base --record
    make bench-engine ARGS='--record'

It loads a checkpoint of BASE_DIR through the engine (nanochat/inference/engine.py: KV cache,
one prefill shared by the sample rows) and generates from a fixed prompt, greedily and with
the stop tokens off, so every run times the same --max-tokens tokens; one untimed warm-up
generation per batch size comes first, then the median of --repeats timed ones. With
--record it appends a row to docs/benchmarks.md naming the machine. Not a stage: a tool
beside chat/serve, the end of the pipeline (... -> SFT -> RL -> chat/serve).
"""

from __future__ import annotations

import statistics
import time
from datetime import date

from nanochat.bench import machine, record
from nanochat.common import CHECKPOINT_KINDS, CliParser, base_dir, positive_int, run_main

SECTION = "## Stage 8: inference (scripts.bench_engine)"
HEADER = (
    "| date | machine | torch | model | prompt tokens | first token | batch 1 tokens/s | "
    "batch 8 tokens/s |\n|---|---|---|---|---|---|---|---|"
)
PROMPT = "Explain in a few sentences what a tokenizer does and why language models need one."


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.bench_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="auto", choices=("auto", *CHECKPOINT_KINDS))
    p.add_argument("--tag")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=5, help="median of N (default 5)")
    p.add_argument("--record", action="store_true", help="append the row to docs/benchmarks.md")
    return p


def timed_generation(engine, tokens: list[int], batch: int, max_tokens: int, sync) -> tuple:
    """(seconds to the first token, decode tokens/s after it) for one generation."""
    start = time.perf_counter()
    first = None
    produced = 0
    for step_tokens, _ in engine.generate(
        tokens, num_samples=batch, max_tokens=max_tokens, temperature=0.0
    ):
        sync()
        if first is None:
            first = time.perf_counter() - start
            after_first = time.perf_counter()
        else:
            produced += len(step_tokens)
    decode_s = time.perf_counter() - after_first if first is not None else 0.0
    return first or 0.0, (produced / decode_s if decode_s else 0.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from nanochat import runtime
    from nanochat.inference.engine import Engine, load_chat_model

    rt = runtime.start()
    model, tokenizer, meta = load_chat_model(
        base_dir(), args.source, rt.device, tag=args.tag, other_flag="--source"
    )
    engine = Engine(model, tokenizer, stop=False)
    conversation = {
        "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ""}]
    }
    tokens = tokenizer.render_for_completion(conversation)

    def sync() -> None:
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    with rt.autocast():
        for batch in (1, 8):
            timed_generation(engine, tokens, batch, args.max_tokens, sync)  # warm-up
            runs = [timed_generation(engine, tokens, batch, args.max_tokens, sync)
                    for _ in range(args.repeats)]  # fmt: skip
            results[batch] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )
    config = meta.get("model_config", {})
    label = (
        f"d{config.get('n_layer', '?')} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
    )
    first_ms = results[1][0] * 1000
    print(
        f"{label}: first token {first_ms:.0f} ms ({len(tokens)} prompt tokens), "
        f"decode {results[1][1]:,.0f} tokens/s at batch 1, {results[8][1]:,.0f} at batch 8"
    )
    if args.record:
        row = (
            f"| {date.today()} | {machine()} | {torch.__version__} | {label} | {len(tokens)} | "
            f"{first_ms:.0f} ms | {results[1][1]:,.0f} | {results[8][1]:,.0f} |"
        )
        record(row, SECTION, HEADER)
        print("recorded in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    run_main(main)
