"""Every preset trains what it downloads and what it prices: its planned pretraining tokens
(the depth dial over the pretrain command the preset builds) fit the shards it fetches, and
its estimate is derived from that same command."""

from __future__ import annotations

import pytest

from backends import pricing
from backends.command import script_args
from backends.presets import PRESETS
from backends.stages import STAGES_BY_NAME, gpu_count, remote_gpu
from nanochat.data.dataset import REMOTE_DATASETS
from nanochat.model import dial
from scripts.base_train import planned

PRETRAIN = STAGES_BY_NAME["pretrain"]
REMOTE = [name for name, p in PRESETS.items() if p.knobs.get("dataset") in REMOTE_DATASETS]


def pretrain_argv(name: str) -> list[str]:
    return script_args(PRETRAIN, name, PRESETS[name].knobs)


@pytest.mark.parametrize("name", REMOTE)
def test_planned_tokens_fit_the_shards(name):
    knobs = PRESETS[name].knobs
    processes = gpu_count(remote_gpu(PRETRAIN, knobs["gpu"]))
    the_dial = planned(pretrain_argv(name), processes, dial.DEFAULT_VOCAB)
    dataset = REMOTE_DATASETS[knobs["dataset"]]
    room = int(knobs["shards"]) * dataset.tokens_per_shard
    assert the_dial.tokens <= room, (
        f"{name} trains {the_dial.tokens / 1e9:.2f}B tokens but {knobs['shards']} shards hold "
        f"~{room / 1e9:.2f}B"
    )
    # Not absurdly many either (each shard is ~100 MB to fetch and store).
    assert room <= 2 * the_dial.tokens


def test_gpt2_trains_the_run_it_prices():
    argv = pretrain_argv("gpt2")
    assert "--ratio=8" in argv and "--fp8" in argv
    the_dial = planned(argv, 8, dial.DEFAULT_VOCAB)
    assert the_dial.ratio == 8 and 5.5e9 < the_dial.tokens < 6.2e9  # d24: ~5.8B tokens
    estimate = pricing.estimate(PRETRAIN, "gpt2", "H100:8", "H100:8", argv)
    assert f"{the_dial.tokens / 1e9:.2f}B tokens at ~" in estimate.derived
    assert "fp8" in estimate.derived


def test_speedrun_pretraining_is_priced_from_the_measured_throughput():
    """143K tokens/s per H100 at d20 (docs/benchmarks.md) over ~5.2B tokens on 8 of them:
    about 1.3-1.5 h with the evals, not the 3 h once guessed."""
    estimate = pricing.estimate(PRETRAIN, "speedrun", "H100:8", "H100:8", pretrain_argv("speedrun"))
    assert 1.25 < estimate.hours < 1.55
    assert estimate.cost == pytest.approx(
        estimate.hours * (8 * pricing.GPU_PRICE["H100"] + 64 * pricing.CPU_CORE_PRICE
                          + 256 * pricing.MEMORY_PRICE)
    )  # fmt: skip
    half = pricing.estimate(PRETRAIN, "speedrun", "H100:4", "H100:8", pretrain_argv("speedrun"))
    assert half.hours == pytest.approx(2 * estimate.hours, rel=0.01)


def test_pretraining_on_cpu_containers_is_priced_from_the_cpu_measurement():
    """GPU=cpu with a GPU preset must not print a made-up quarter hour: it is thousands."""
    estimate = pricing.estimate(PRETRAIN, "speedrun", None, "H100:8", pretrain_argv("speedrun"))
    assert estimate.hours > 1000 and "tokens/s" in estimate.derived
    tiny = pricing.estimate(PRETRAIN, "tiny", None, None, pretrain_argv("speedrun"))
    assert tiny.hours == pricing.EXPECTED_HOURS["tiny"]["pretrain"]  # measured: the table
