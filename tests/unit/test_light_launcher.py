"""The orchestration layer (tasks.py, backends/, the Modal app included) runs without the
training dependencies, so a laptop that only launches remote runs installs nothing heavy."""

from __future__ import annotations

import sys
import textwrap

from conftest import REPO, run_cli

HEAVY = ("torch", "numpy", "pyarrow", "tiktoken", "rustbpe", "requests", "tqdm")

PROBE = textwrap.dedent(f"""
    import importlib.abc, sys
    HEAVY = {HEAVY!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"blocked heavy import: {{name}}")
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, {str(REPO)!r})
    import tasks
    from backends.planning import plan
    from backends.catalog import help_text
    import backends.modal_app, backends.modal_backend, backends.docker_backend
    cmd = plan("pretrain", preset="speedrun", gpus="8", dry_run=True).command
    remote = plan("pretrain", preset="speedrun", backend="modal", dry_run=True)
    assert backends.modal_backend.describe(remote).endswith(cmd.shell())
    assert help_text()
    print(cmd.shell())
    print(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY))
""")


def test_launcher_imports_and_plans_with_heavy_packages_blocked():
    result = run_cli([sys.executable, "-c", PROBE])
    assert result.returncode == 0, result.stderr
    command, loaded = result.stdout.strip().splitlines()
    assert command.startswith("torchrun --standalone --nproc_per_node=8 -m scripts.base_train")
    assert loaded == "[]"
