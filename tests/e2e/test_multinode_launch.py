"""NODES>1 up to each engine's boundary: the torchrun prefix, docker's host network, the Modal
clustered functions (introspected offline), the SkyPilot task (parsed by SkyPilot itself) and
the Slurm script (run with stand-ins for srun and scontrol), the checkpoint's commit protocol.

Not run here: two hosts, NCCL, a Modal cluster (no account), a SkyPilot cloud, a Slurm
controller. The rendezvous itself runs for real in tests/e2e/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest
from conftest import REPO, run_cli

from backends import (
    cluster_files,
    command,
    docker_backend,
    modal_app,
    modal_backend,
    modal_volumes,
    pricing,
)
from backends.planning import plan
from backends.stages import CLUSTER_SIZES, STAGES, STAGES_BY_NAME
from nanochat.common import COMMIT_DIR_ENV, UsageError
from nanochat.training import checkpoint

SKYPILOT_PYTHON = REPO / ".venv-skypilot" / "bin" / "python"
NODE1 = {"nodes": "2", "node_rank": "1", "master_addr": "10.0.0.1"}


def test_the_torchrun_prefix_on_each_node():
    cmd = plan("pretrain", preset="smoke", dry_run=True, **NODE1).command
    assert cmd.argv[:6] == [
        "torchrun", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
        "--master_port=29500", "--nproc_per_node=1",
    ]  # fmt: skip
    single = plan("pretrain", preset="smoke", dry_run=True).command  # one CPU process here
    assert single.argv[:3] == ["python", "-m", "scripts.base_train"]
    assert cmd.argv[cmd.argv.index("--") + 1 :] == single.argv[3:]  # the same script arguments
    ipv6 = plan("pretrain", preset="smoke", dry_run=True, nodes="2", node_rank="0",
                master_addr="fd00::1", master_port="29555").command  # fmt: skip
    assert "--master_addr=fd00::1" in ipv6.argv and "--master_port=29555" in ipv6.argv


def test_a_dry_run_says_what_each_node_must_do(tmp_path):
    result = run_cli(
        "make pretrain PRESET=smoke NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 DRY_RUN=1".split()
        + [f"BASE_DIR={tmp_path}"]
    )
    assert result.returncode == 0, result.stderr
    assert "2 nodes x 1 process(es) = 2 ranks; this is node 1" in result.stderr
    assert "x 2 process(es) x accumulation 1" in result.stderr  # the dial counts every node


def test_docker_shares_the_hosts_network_for_multi_node(tmp_path):
    multi = plan("pretrain", preset="smoke", backend="docker", dry_run=True,
                 base_dir=str(tmp_path), **NODE1)  # fmt: skip
    spec = docker_backend.container_spec(multi, "nanochat:0123456789ab", False, {})
    assert spec["network_mode"] == "host"
    assert "--network host" in shlex.join(docker_backend.cli_argv(spec))
    single = plan("pretrain", preset="smoke", backend="docker", dry_run=True,
                  base_dir=str(tmp_path))  # fmt: skip
    assert "network_mode" not in docker_backend.container_spec(single, "x", False, {})


# --- Modal ---------------------------------------------------------------------------------


def test_modal_has_a_clustered_function_per_size_for_each_multi_gpu_stage():
    multi = [stage.name for stage in STAGES if stage.multiprocess]
    assert {key for key in modal_app.CLUSTER_FUNCTIONS} == {
        (name, n) for name in multi for n in CLUSTER_SIZES
    }
    mounts = sorted(f"/vol/{name}" for name in modal_volumes.VOLUMES)
    for (name, nodes), fn in modal_app.CLUSTER_FUNCTIONS.items():
        info = fn.info().cluster_info
        assert (info.size, info.rdma) == (nodes, True)
        assert fn._spec_.gpus == "H100:8" and sorted(fn._spec_.volumes) == mounts
        assert getattr(modal_app, modal_app.function_name(name, nodes)) is fn
    pretrain = STAGES_BY_NAME["pretrain"]
    fn, on_cpu = modal_app.function_for(pretrain, "H100:8", 2)
    assert fn is modal_app.CLUSTER_FUNCTIONS[("pretrain", 2)] and not on_cpu
    fn, _ = modal_app.function_for(pretrain, "B200:8", 4)
    assert fn is not modal_app.CLUSTER_FUNCTIONS[("pretrain", 4)]  # a with_options copy
    # a one-process stage ignores NODES: the speedrun's CPU stages run in one container
    tokenizer = STAGES_BY_NAME["tokenizer"]
    assert modal_app.function_for(tokenizer, None, 2)[0] is modal_app.STAGE_FUNCTIONS["tokenizer"]


class FakeCluster:
    """What ``modal.Cluster.from_context()`` answers inside container ``rank``."""

    def __init__(self, rank: int, ips: list[str]):
        self.rank, self.ips = rank, ips

    def container_rank(self) -> int:
        return self.rank

    def container_ips(self) -> list[str]:
        return self.ips


def test_each_container_builds_its_node_of_the_command(base_dir):
    ips = ["fdaa:0:1::a", "fdaa:0:1::b"]
    remote = plan("pretrain", preset="speedrun", backend="modal", nodes="2", dry_run=True)
    knobs = modal_backend.payload(remote)
    assert knobs["nodes"] == 2
    nodes = modal_app.cluster_nodes(2, 29500, FakeCluster(1, ips))
    cmd = modal_app.remote_command(remote.stage, knobs, base_dir, nodes)
    assert "--nnodes=2" in cmd.argv and "--node_rank=1" in cmd.argv
    assert f"--master_addr={ips[0]}" in cmd.argv
    assert cmd.env["NCCL_SOCKET_FAMILY"] == "AF_INET6"  # Modal's cluster network is IPv6
    with pytest.raises(RuntimeError, match="NODES=4 but the Modal cluster has 2 containers"):
        modal_app.cluster_nodes(4, 29500, FakeCluster(0, ips))


def test_modal_dry_run_shows_the_cluster_and_its_cost():
    one = plan("pretrain", preset="speedrun", backend="modal", dry_run=True)
    two = plan("pretrain", preset="speedrun", backend="modal", nodes="2", dry_run=True)
    text = modal_backend.describe(two)
    assert "function stage_pretrain_x2: a cluster of 2 such containers" in text
    assert "'--node_rank=<cluster rank>'" in text
    a, b = modal_backend.estimate(one), modal_backend.estimate(two)
    assert b.nodes == 2 and "2 nodes x H100:8" in b.line()
    assert b.hours == pytest.approx(a.hours / 2)  # linear scaling, assumed (docs/multinode.md)
    assert b.cost == pytest.approx(b.hours * 2 * pricing.hourly_cost("H100:8", two.stage))


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"nodes": "3"}, "NODES=3: Modal clusters here have 2 or 4 nodes"),
        ({"nodes": "2", "gpu": "H100:4"}, "needs whole 8-GPU nodes (GPU=H100:8 or the like)"),
        ({"nodes": "2", "gpu": "cpu"}, "needs whole 8-GPU nodes"),
    ],
)
def test_modal_cluster_combinations_that_cannot_run(knobs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan("pretrain", preset="speedrun", backend="modal", dry_run=True, **knobs)


def test_speedrun_with_nodes_is_modal_only():
    with pytest.raises(UsageError, match="NODES>1 runs on BACKEND=modal only"):
        from backends.planning import speedrun_plans

        speedrun_plans(preset="speedrun", nodes="2", node_rank="0", master_addr="h", dry_run=True)


# --- the checkpoint's commit protocol --------------------------------------------------------


def test_commit_requests_are_answered_by_the_containers_committer(tmp_path, monkeypatch):
    requests = tmp_path / "requests"
    requests.mkdir()
    commits = []
    committer = modal_volumes.CheckpointCommitter(
        tmp_path, commit=commits.append, poll_s=3600, requests=requests, request_poll_s=0.01
    )
    committer.start()
    monkeypatch.setenv(COMMIT_DIR_ENV, str(requests))
    try:
        checkpoint.commit_files("step 3 rank 1", timeout_s=30)
        assert commits == [("nanochat-checkpoints",)]

        def broken(_names):
            raise OSError("volume is full")

        committer.commit = broken
        with pytest.raises(checkpoint.CheckpointError, match="OSError: volume is full"):
            checkpoint.commit_files("step 6 rank 1", timeout_s=30)
    finally:
        committer.stop()
    assert list(requests.iterdir()) == []


class Gathered:
    """``collect`` as two ranks see it, one call at a time: what rank 1 gave, then rank 0."""

    def __init__(self):
        self.calls: list = []

    def rank1(self, obj):
        self.calls.append(obj)
        return [None, obj]

    def rank0(self, obj):
        theirs = self.calls.pop(0)
        return [obj, theirs]


def test_rank_0_writes_the_meta_from_every_ranks_records_without_reading_their_files(tmp_path):
    """On Modal another node's files are invisible here until it commits and this node
    reloads: rank 0 must not need them. Rank 1's file lives in its own folder (its node)."""
    import torch

    here, there = tmp_path / "node0" / "d4", tmp_path / "node1" / "d4"
    gathered = Gathered()
    checkpoint.save(there, 5, None, {"x": torch.ones(3)}, {}, rank=1, world_size=2,
                    collect=gathered.rank1)  # fmt: skip
    checkpoint.save(here, 5, {"w": torch.zeros(2)}, {"x": torch.ones(3)}, {"run_config": {}},
                    rank=0, world_size=2, collect=gathered.rank0)  # fmt: skip
    meta = json.loads(checkpoint.meta_file(here, 5).read_text())
    assert set(meta["files"]) == {"model_000005.pt", "rank_000005_r0.pt", "rank_000005_r1.pt"}
    assert not (here / "rank_000005_r1.pt").exists()  # never looked for on node 0
    with pytest.raises(checkpoint.CheckpointError, match="rank_000005_r1.pt is missing"):
        checkpoint.verify(here, 5)  # until node 1's commit is visible here:
    (here / "rank_000005_r1.pt").write_bytes((there / "rank_000005_r1.pt").read_bytes())
    assert checkpoint.verify(here, 5)["world_size"] == 2


def test_a_save_cut_short_by_a_lost_node_leaves_no_checkpoint(tmp_path):
    """A node preempted mid-save: rank 0's gather fails (the collective's error) before any
    meta is written, so the step is absent and the previous checkpoint is the one resumed."""
    import torch

    folder = tmp_path / "d4"
    state = {"x": torch.ones(3)}
    checkpoint.save(folder, 3, {"w": torch.zeros(2)}, state, {"run_config": {}})

    def lost(_records):
        raise RuntimeError("Connection closed by peer")  # what gloo/NCCL raise

    with pytest.raises(RuntimeError, match="closed by peer"):
        checkpoint.save(folder, 6, {"w": torch.zeros(2)}, state, {"run_config": {}},
                        world_size=2, collect=lost)  # fmt: skip
    assert checkpoint.steps(folder) == [3]
    assert checkpoint.latest(folder).step == 3


def test_every_rank_resumes_the_step_rank_0_chose(tmp_path):
    """Another node's view of the folder can differ from rank 0's (not yet reloaded, NFS
    caching): ranks take rank 0's step, and one that cannot see it stops the run in one line."""
    import torch

    def save(folder, step):
        checkpoint.save(folder, step, {"w": torch.zeros(2)}, {"x": torch.ones(1)}, {},
                        keep_last=5)  # fmt: skip

    lagging, missing = tmp_path / "lagging" / "d4", tmp_path / "missing" / "d4"
    for step in (3, 6):  # this node still sees step 6, which rank 0 set aside as damaged
        save(lagging, step)
    save(missing, 6)
    chosen = lambda _mine: [3]  # noqa: E731  (rank 0's answer)
    found = checkpoint.start_point(lagging, "auto", master=False, collect=chosen)
    assert found.step == 3
    with pytest.raises(UsageError, match="rank 0 resumes step 3 of .*, which another node"):
        checkpoint.start_point(missing, "auto", master=False, collect=chosen)
    assert checkpoint.start_point(lagging, "never", master=False, collect=lambda _: [None]) is None


# --- SkyPilot and Slurm ------------------------------------------------------------------------


def test_skypilot_task_parses_with_skypilot(tmp_path):
    if not SKYPILOT_PYTHON.exists():
        pytest.skip(
            "SkyPilot's parser is not installed here: `make test` installs it into "
            ".venv-skypilot; the task was not parsed by SkyPilot"
        )
    out, unset = tmp_path / "task.sky.yaml", tmp_path / "no-bucket.sky.yaml"
    for path, bucket in ((out, ["BUCKET=my-bucket"]), (unset, [])):
        result = run_cli(
            "make skypilot-task NODES=2 PRESET=gpt2 IMAGE=ghcr.io/me/nanochat:1".split()
            + bucket + [f"OUT={path}"]
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "launch it with: sky launch -c nanochat" in result.stdout
    probe = (
        "import json, sys, sky\n"
        "t = sky.Task.from_yaml(sys.argv[1])\n"
        "(r,) = t.resources\n"
        "print(json.dumps({'nodes': t.num_nodes, 'acc': r.accelerators, 'image': str(r.image_id),"
        " 'mounts': sorted(t.storage_mounts), 'bucket': t.storage_mounts['/data/nanochat'].name,"
        " 'run': t.run}))\n"
    )

    def parse(path):
        return subprocess.run(
            [str(SKYPILOT_PYTHON), "-c", probe, str(path)], capture_output=True, text=True,
            timeout=120, env={**os.environ, "HOME": str(tmp_path)},
        )  # fmt: skip

    parsed = parse(out)
    assert parsed.returncode == 0, parsed.stderr[-3000:]
    task = json.loads(parsed.stdout.strip().splitlines()[-1])
    assert task["nodes"] == 2 and task["acc"] == {"H100": 8}
    assert "docker:ghcr.io/me/nanochat:1" in task["image"]
    assert task["mounts"] == ["/data/nanochat"] and task["bucket"] == "my-bucket"
    planned = plan("pretrain", preset="gpt2", dry_run=True, nodes="2", node_rank="0",
                   master_addr="h", gpus="8").command  # fmt: skip
    script_args = shlex.join(planned.argv[planned.argv.index("--") :])
    assert '--node_rank="$SKYPILOT_NODE_RANK" --master_addr="$MASTER_ADDR"' in task["run"]
    assert task["run"].rstrip().endswith(script_args)  # the same script arguments
    # Without BUCKET, SkyPilot itself refuses the task until --env NANOCHAT_BUCKET=... is given
    refused = parse(unset)
    assert refused.returncode != 0
    assert "Environment variable 'NANOCHAT_BUCKET' is None" in refused.stderr


def test_slurm_script_runs_the_same_command_on_each_node(tmp_path):
    """The sbatch file run by bash with stand-ins: scontrol names two hosts, srun runs its
    command once per node with SLURM_NODEID, torchrun prints its argv."""
    out = tmp_path / "job.sbatch"
    shared = tmp_path / "shared"
    result = run_cli(
        ["make", "slurm-script", "NODES=2", "PRESET=speedrun", f"BASE_DIR={shared}", f"OUT={out}"]
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=TERM@120"):  # fmt: skip
        assert line in text.splitlines()
    fake = tmp_path / "bin"
    fake.mkdir()
    stand_ins = {
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
        "srun": 'for i in 0 1; do SLURM_NODEID=$i "${@: -3}"; done',  # bash -c '<command>'
        "torchrun": 'echo "node $SLURM_NODEID: torchrun $*"',
    }
    for name, body in stand_ins.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_SUBMIT_DIR": str(tmp_path)}  # fmt: skip
    ran = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    planned = plan("pretrain", preset="speedrun", dry_run=True, nodes="2", node_rank="0",
                   master_addr="gpu-a", gpus="8").command  # fmt: skip
    for rank, line in enumerate(ran.stdout.strip().splitlines()):
        want = planned.shell().replace("--node_rank=0", f"--node_rank={rank}")
        assert line == f"node {rank}: {want}"
    assert f"export NANOCHAT_BASE_DIR={shared}" in text


@pytest.mark.parametrize(
    "kind,knobs,message",
    [
        ("slurm", {}, "a cluster file is for a multi-node run: give NODES=2 or more"),
        ("slurm", {"nodes": "2", "node_rank": "1"}, "NODE_RANK is set by the cluster"),
        ("skypilot", {"nodes": "2", "gpu": "cpu"}, "a cluster file needs GPU nodes"),
        ("skypilot", {"nodes": "2", "backend": "modal"}, "leave BACKEND out"),
        ("slurm", {"nodes": "2", "stage_name": "tokenizer"}, "runs as one process"),
        ("slurm", {"nodes": "2", "preset": "smoke"}, "total batch 4096 tokens is not a multiple"),
        ("skypilot", {"nodes": "2", "gpus": "16"}, "GPUS=16 but a node has 8 GPU"),
    ],
)
def test_cluster_files_refuse_what_cannot_run(kind, knobs, message, tmp_path):
    knobs = dict(knobs)
    stage = knobs.pop("stage_name", "pretrain")
    with pytest.raises(UsageError, match=message):
        cluster_files.write(kind, stage, str(tmp_path / "x"), None, **knobs)
    assert not (tmp_path / "x").exists()


def test_cluster_file_out_is_checked_and_never_overwrites_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "job.sbatch"
    assert cluster_files.write("slurm", "pretrain", str(mine), None, nodes="2",
                               preset="speedrun") == 0  # fmt: skip
    first = mine.read_text()
    assert cluster_files.write("slurm", "pretrain", str(mine), None, nodes="2", gpus="4",
                               preset="speedrun") == 0  # fmt: skip
    assert mine.read_text() != first  # its own file: rewritten
    theirs = tmp_path / "notes.txt"
    theirs.write_text("mine, not nanochat's\n")
    cases = [
        ({"out": str(theirs)}, "exists and was not written by make slurm-script"),
        ({"out": str(tmp_path)}, "is a folder: name the file to write"),
        ({"out": str(tmp_path / "no" / "x.sbatch")}, "the folder .* does not exist"),
        ({"out": " "}, "OUT is empty"),
        ({"stage_name": ""}, "STAGE is empty"),
        ({"bucket": ""}, "BUCKET is empty"),
    ]
    for given, message in cases:
        args = {"stage_name": "pretrain", "out": str(tmp_path / "x"), "bucket": None, **given}
        with pytest.raises(UsageError, match=message):
            cluster_files.write("slurm", args["stage_name"], args["out"], None,
                                args["bucket"], nodes="2", preset="speedrun")  # fmt: skip
    assert theirs.read_text() == "mine, not nanochat's\n"
    assert not (tmp_path / "no").exists() and not (tmp_path / "x").exists()


def test_make_help_lists_the_cluster_files():
    result = run_cli(["make", "help"])
    assert "skypilot-task" in result.stdout and "slurm-script" in result.stdout
    assert "NODE_RANK=..." in result.stdout and "MASTER_ADDR=..." in result.stdout


def test_one_node_keeps_the_standalone_rendezvous():
    assert command.SINGLE_NODE.torchrun_flags() == ["--standalone"]
    cmd = plan("pretrain", preset="smoke", gpus="2", dry_run=True).command
    assert cmd.argv[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
