"""The suite is hermetic: a user's exported knob variables (BASE_DIR, PRESET, DEPTH, ARGS,
...), secrets and nanochat variables never reach a test, and the user's artifacts root is
never read or written (tests/conftest.py clears them all when it is imported)."""

from __future__ import annotations

import sys

from conftest import REPO, run_cli


def test_a_users_exported_knobs_and_base_dir_are_never_touched(tmp_path):
    users_base = tmp_path / "users-artifacts"
    users_base.mkdir()
    (users_base / "precious.txt").write_text("a week of training")
    exported = {
        "BASE_DIR": str(users_base),
        "NANOCHAT_BASE_DIR": str(users_base),
        "PRESET": "gpt2",
        "DEPTH": "99",
        "GPUS": "7",
        "GPU": "H100:8",
        "SOURCE": "rl",
        "RUN": "users-run",
        "ARGS": "--no-such-flag",
        "BACKEND": "modal",
        "DATASET": "users-data",
        "SHARDS": "3",
        "FORCE": "all",
        "DRY_RUN": "1",
        "WANDB_API_KEY": "users-key",
        "NANOCHAT_DOTENV": str(tmp_path / "users.env"),
    }
    (tmp_path / "users.env").write_text("HF_TOKEN=users-token\n")
    probe = REPO / "tests" / "hermetic_probe.py"
    result = run_cli(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
        env=exported,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout
    assert sorted(p.name for p in users_base.iterdir()) == ["precious.txt"]


def test_make_test_ignores_exported_stage_knobs():
    """`make test` itself: a BACKEND/EXTRAS the shell exports does not shrink the install
    to the launcher's, and an exported ARGS (meant for the stages) is no pytest flag."""
    exported = {"BACKEND": "modal", "EXTRAS": "modal", "ARGS": "--no-such-pytest-flag"}
    result = run_cli(["make", "-n", "--no-print-directory", "test"], env=exported)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "invoke test" in line]
    assert "--no-such-pytest-flag" not in line
    assert ".installed-modal" not in result.stdout
    given = run_cli(["make", "-n", "--no-print-directory", "test", "ARGS=-k tokenizer"])
    assert "--args='-k tokenizer'" in given.stdout
