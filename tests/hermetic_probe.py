"""Run only by tests/e2e/test_hermetic.py, in a pytest of its own whose environment holds a
user's knob variables: a test that runs a stage through the front door with no knobs."""

from __future__ import annotations

import os

from conftest import run_cli

from backends.secrets import load_secrets


def test_a_stage_through_make_sees_none_of_the_users_environment(base_dir):
    assert load_secrets() == {}
    assert not {"BASE_DIR", "PRESET", "DEPTH", "ARGS", "WANDB_API_KEY"} & set(os.environ)
    result = run_cli(["make", "download"])  # the default preset: the embedded corpus
    assert result.returncode == 0, result.stderr[-2000:]
    assert (base_dir / "base_data" / "embedded").is_dir()
