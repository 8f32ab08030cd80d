"""NODES=2 for real on this machine, and a run resumed on another number of processes.

Two torchrun agents (``make pretrain PRESET=smoke NODES=2 NODE_RANK=0|1
MASTER_ADDR=127.0.0.1``, torchrun's static rendezvous on node 0's TCP port, gloo) stand in
for two machines sharing BASE_DIR. A run started on 2 processes keeps its 2 data streams
when resumed on 1 (which reads both) or 2 again, so 2 nodes x 1 process, 1 node x 2
processes and the resumed 1 process x 2 micro-batches train on the same rows: their losses
agree step for step. What needs more than this machine (two hosts, NCCL, GPUs) is not run.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli

from nanochat.training import checkpoint

pytestmark = pytest.mark.first

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two processes share the two cores
STEPS = 6  # the smoke preset's


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A BASE_DIR with the embedded corpus and a small tokenizer (copied for each run)."""
    from helpers.builders import tokenizer_for

    from nanochat.data import shards
    from nanochat.data.dataset import ensure_embedded

    base = tmp_path_factory.mktemp("prepared")
    train_paths, _ = shards.split_shards(ensure_embedded(base))
    tokenizer_for(list(shards.iter_texts(train_paths)), 1024, base)
    return base


def fresh(prepared: Path, tmp_path: Path, name: str) -> Path:
    base = tmp_path / name
    shutil.copytree(prepared, base)
    return base


def make_pretrain(base: Path, *knobs: str, timeout: float = 300):
    """The smoke pretraining on this machine; the launcher shares the cores out."""
    return run_cli(
        ["make", "pretrain", "PRESET=smoke", f"BASE_DIR={base}", *knobs], timeout=timeout
    )


def losses(base: Path) -> list[float]:
    lines = (base / "logs" / "pretrain-d4.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(prepared, tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """The done-when run: two nodes started together on this machine; (BASE_DIR, each
    node's (stdout, stderr), node 0 first)."""
    base = fresh(prepared, tmp_path_factory.mktemp("two-nodes"), "base")
    port = free_port()
    nodes = {
        rank: subprocess.Popen(
            f"make pretrain PRESET=smoke NODES=2 NODE_RANK={rank} MASTER_ADDR=127.0.0.1 "
            f"MASTER_PORT={port}".split()
            + [f"BASE_DIR={base}"],
            cwd=REPO,
            env=cli_env(ONE_THREAD),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (1, 0)  # node 1 first: it waits for node 0's rendezvous
    }
    outputs = {rank: node.communicate(timeout=300) for rank, node in nodes.items()}
    for rank, node in nodes.items():
        assert node.returncode == 0, outputs[rank][1][-3000:]
    return base, [outputs[0], outputs[1]]


def test_two_nodes_write_one_checkpoint(two_nodes):
    base, [(out0, err0), (out1, _)] = two_nodes
    assert "--nnodes=2 --node_rank=0 --master_addr=127.0.0.1" in err0
    assert "accumulation 1, 2 process(es)" in err0
    assert "step 00006/6" in out0 and "step 0" not in out1  # node 0 holds rank 0: it reports
    # One checkpoint per save, written by both nodes: node 0's model and meta, a file per rank.
    folder = checkpoint.checkpoint_dir(base, "base", "d4")
    assert checkpoint.steps(folder) == [6, 3]
    meta = checkpoint.verify(folder, 6)  # sizes and hashes as each rank recorded them
    assert meta["world_size"] == 2
    assert set(meta["files"]) == {"model_000006.pt", "rank_000006_r0.pt", "rank_000006_r1.pt"}
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert (base / "report" / "pretrain.md").is_file()
    curve = losses(base)
    assert len(curve) == STEPS and curve[-1] < curve[0]


def test_a_checkpoint_resumes_on_another_number_of_processes(prepared, two_nodes, tmp_path):
    """Steps 1-2 on 1 node x 2 processes, 3-4 on 1 process x 2 micro-batches, 5-6 on 2
    processes again, each resuming the other's checkpoint: the losses of the uninterrupted
    2-node run, step for step."""
    base = fresh(prepared, tmp_path, "base")
    for gpus, stop in (("2", "ARGS=--stop-at=2"), ("1", "ARGS=--stop-at=4"), ("2", None)):
        result = make_pretrain(base, f"GPUS={gpus}", *([stop] if stop else []))
        assert result.returncode == 0, result.stderr[-3000:]
        if gpus == "1":
            assert (
                "step 2 was written by 2 process(es), this run has 1: "
                "optimizer state and data position re-sharded"
            ) in result.stderr
    assert "step 4 was written by 1 process(es), this run has 2" in result.stderr
    assert losses(base) == pytest.approx(losses(two_nodes[0]), rel=1e-5)


CONTAINER = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from backends import modal_app
from backends.presets import PRESETS

class Cluster:  # what modal.Cluster.from_context() answers in container {rank}
    def container_rank(self):
        return {rank}

    def container_ips(self):
        return ["127.0.0.1", "127.0.0.1"]

knobs = {{**PRESETS["smoke"].knobs, "preset": "smoke", "master_port": {port},
         "env": {{"OMP_NUM_THREADS": "1"}}}}  # what the launcher's payload holds
print(json.dumps(modal_app.run_stage("pretrain", {{**knobs, "nodes": 2}}, Cluster())))
"""


def test_a_modal_cluster_saves_whole_checkpoints_where_nodes_do_not_see_each_other(
    prepared, two_nodes, tmp_path
):
    """The clustered function's body (``run_stage``) in two processes standing in for two
    containers, each with its own copy of the volumes, as on Modal before a node's commit
    is reloaded elsewhere: the run finishes, node 0's view has the model and the meta, node
    1's its own rank files, and together (what the commits make of the volume) every
    checkpoint verifies. The losses are the 2-node run's."""
    port = free_port()
    views = [tmp_path / f"container{rank}" for rank in (0, 1)]
    for view in views:
        data = view / "vol" / "nanochat-data"
        for entry in ("base_data", "tokenizer"):
            shutil.copytree(prepared / entry, data / entry)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTAINER.format(repo=str(REPO), rank=rank, port=port)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(
                {"NANOCHAT_VOLUME_ROOT": str(view / "vol"), "NANOCHAT_BASE_DIR": str(view / "base")}
            ),
        )  # fmt: skip
        for rank, view in ((1, views[1]), (0, views[0]))
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    (out1, _), (out0, err0) = outputs
    result = json.loads(out0.strip().splitlines()[-1])
    assert result["exit_code"] == 0 and result["nodes"] == 2
    assert "(node 0 of 2): torchrun --nnodes=2 --node_rank=0 --master_addr=127.0.0.1" in out0
    folders = [view / "vol" / "nanochat-checkpoints" / "base_checkpoints" / "d4" for view in views]
    assert sorted(p.name for p in folders[1].iterdir()) == [
        "rank_000003_r1.pt",
        "rank_000006_r1.pt",
    ]
    assert not (folders[0] / "rank_000006_r1.pt").exists()
    with pytest.raises(checkpoint.CheckpointError, match="rank_000006_r1.pt is missing"):
        checkpoint.verify(folders[0], 6)  # node 0 never needed node 1's files
    for f in folders[1].iterdir():  # the volume once both nodes' commits are in
        shutil.copy2(f, folders[0] / f.name)
    assert checkpoint.steps(folders[0]) == [6, 3]
    for step in (6, 3):
        assert checkpoint.verify(folders[0], step)["world_size"] == 2
    logs = views[0] / "vol" / "nanochat-checkpoints" / "logs" / "pretrain-d4.jsonl"
    curve = [json.loads(line)["loss"] for line in logs.read_text().splitlines()]
    assert curve == pytest.approx(losses(two_nodes[0]), rel=1e-5)
    assert "re-sharded" not in err0
