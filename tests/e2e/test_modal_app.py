"""BACKEND=modal up to the boundary: the real Modal app, introspected offline.

What cannot run here (no Modal account, no network to Modal): building the image on Modal,
starting containers, committing volumes, the web endpoint. Everything before that runs for
real: the app imports without a token, every function carries the table's GPU, timeout,
retries and volumes, and the functions' bodies run the tiny stages against a temp directory
standing in for the volumes. The speedrun's orchestrator and its lease: test_modal_speedrun.py.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import modal
import pytest
from conftest import REPO, run_cli

from backends import modal_app, modal_backend, modal_volumes
from backends.planning import plan
from backends.secrets import load_secrets
from backends.stages import STAGES, STAGES_BY_NAME, remote_gpu
from nanochat.common import UsageError

# Function.local() warns that volumes are not mounted locally: the stand-in is the point.
pytestmark = pytest.mark.filterwarnings("ignore:The stage_.* function is executing locally")

NO_TOKEN = {"HOME": "/nonexistent-home", "MODAL_TOKEN_ID": "", "MODAL_TOKEN_SECRET": ""}


@pytest.fixture
def volume_root(tmp_path, monkeypatch):
    root = tmp_path / "vol"
    monkeypatch.setenv(modal_volumes.VOLUME_ROOT_ENV, str(root))
    return root


def test_app_imports_without_a_token_and_without_torch():
    probe = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import backends.modal_app as m
        specs = {{name: [fn._spec_.gpus, sorted(fn._spec_.volumes)]
                 for name, fn in m.STAGE_FUNCTIONS.items()}}
        print(json.dumps(specs))
        print("torch" in sys.modules)
    """)
    result = run_cli([sys.executable, "-c", probe], env=NO_TOKEN)
    assert result.returncode == 0, result.stderr
    specs_line, torch_loaded = result.stdout.strip().splitlines()[-2:]
    specs = json.loads(specs_line)
    assert torch_loaded == "False"
    assert set(specs) == {stage.name for stage in STAGES}
    mounts = sorted(f"/vol/{name}" for name in modal_volumes.VOLUMES)
    for stage in STAGES:
        assert specs[stage.name] == [remote_gpu(stage, None), mounts]


def test_each_stage_function_follows_the_stage_table():
    for stage in STAGES:
        fn = getattr(modal_app, modal_app.function_name(stage.name))
        assert fn is modal_app.STAGE_FUNCTIONS[stage.name]
        options = modal_app.stage_options(stage)
        assert fn._spec_.gpus == options["gpu"]
        assert options["timeout"] == int(stage.timeout_h * 3600) <= 24 * 3600
        if stage.retries:
            assert isinstance(options["retries"], modal.Retries)
            assert options["retries"].max_retries == stage.retries
        else:
            assert options["retries"] == 0
        assert {str(k): v.name for k, v in fn._spec_.volumes.items()} == {
            f"/vol/{name}": name for name in modal_volumes.VOLUMES
        }
        # Every function asks for its cores and memory (Modal's default is a sliver).
        assert fn._spec_.cpu >= 4 and fn._spec_.memory >= 8 * 1024
    # The seed's defaults: multi-GPU stages on A100-80GB x4, single-GPU stages on one,
    # CPU-only download. The tokenizer is CPU work: a big CPU container, no rented GPU.
    pretrain = modal_app.STAGE_FUNCTIONS["pretrain"]._spec_
    assert (pretrain.gpus, pretrain.cpu, pretrain.memory) == ("A100-80GB:4", 32.0, 4 * 32 * 1024)
    assert modal_app.STAGE_FUNCTIONS["chat-cli"]._spec_.gpus == "A100-80GB"
    tokenizer = modal_app.STAGE_FUNCTIONS["tokenizer"]._spec_
    assert (tokenizer.gpus, tokenizer.cpu, tokenizer.memory) == (None, 16.0, 64 * 1024)
    assert modal_app.STAGE_FUNCTIONS["download"]._spec_.gpus is None
    # Training stages retry (and resume) after preemption; interactive ones do not.
    assert STAGES_BY_NAME["pretrain"].retries >= 2 and STAGES_BY_NAME["chat-web"].retries == 0


def test_image_context_is_the_repo_filtered_by_our_dockerignore():
    from modal._utils.docker_utils import find_dockerignore_file

    assert modal_app.app.name == "nanochat"
    assert modal_app.DOCKERFILE == REPO / "docker" / "Dockerfile"
    assert modal_app.CONTEXT_DIR == REPO
    # Modal reads the same .dockerignore as docker: environments and secrets stay local.
    found = find_dockerignore_file(modal_app.CONTEXT_DIR, modal_app.DOCKERFILE)
    assert found == REPO / ".dockerignore"
    ignored = modal.FilePatternMatcher.from_file(found)
    assert ignored(Path(".venv/bin/python")) and ignored(Path(".env"))
    # The image holds the whole source (COPY . .): the modules modal_app imports come along.
    assert not ignored(Path("backends/modal_app.py"))
    assert not ignored(Path("backends/modal_volumes.py"))


def test_every_artifact_lives_on_a_volume():
    for stage in STAGES:
        for path in (*stage.reads, *stage.writes, stage.done or ""):
            top = path.split("/", 1)[0]
            if top and not top.startswith("{"):
                assert modal_volumes.volume_of(top)
    assert modal_backend.VOLUME_NAMES == tuple(modal_volumes.VOLUMES)


def test_gpu_override_and_cpu_routing():
    chat_cli, pretrain = STAGES_BY_NAME["chat-cli"], STAGES_BY_NAME["pretrain"]
    fn, on_cpu = modal_app.function_for(pretrain, "A100-80GB:4")
    assert fn is modal_app.STAGE_FUNCTIONS["pretrain"] and not on_cpu
    fn, on_cpu = modal_app.function_for(pretrain, "H100:8")
    assert fn is not modal_app.STAGE_FUNCTIONS["pretrain"] and not on_cpu  # with_options copy
    # The override resizes the container with the GPUs: 8 cores and 32 GiB per GPU.
    assert modal_app.resource_options(pretrain, "H100:8") == {
        "gpu": "H100:8",
        "cpu": 64.0,
        "memory": 256 * 1024,
    }
    fn, on_cpu = modal_app.function_for(chat_cli, None)
    assert fn is modal_app.stage_on_cpu and on_cpu
    assert modal_app.stage_on_cpu._spec_.gpus is None
    fn, on_cpu = modal_app.function_for(STAGES_BY_NAME["tokenizer"], None)
    assert fn is modal_app.STAGE_FUNCTIONS["tokenizer"] and not on_cpu


def test_stage_body_runs_the_tiny_tokenizer_against_a_stand_in_volume(base_dir, volume_root):
    knobs = {"preset": "tiny", "dataset": "embedded", "gpus": 1}
    result = modal_app.STAGE_FUNCTIONS["tokenizer"].local(knobs)
    assert result["stage"] == "tokenizer" and result["exit_code"] == 0
    assert result["gpus"] == 0 and result["gpu_hours"] == 0
    assert (base_dir / "tokenizer").is_symlink()
    assert (volume_root / "nanochat-data" / "tokenizer" / "tokenizer.json").is_file()
    assert (volume_root / "nanochat-data" / "base_data" / "embedded").is_dir()
    assert (volume_root / "nanochat-checkpoints" / "report" / "tokenizer.md").is_file()
    assert modal_volumes.unpersisted(base_dir) == []


def test_cpu_function_runs_any_stage(base_dir, volume_root):
    result = modal_app.stage_on_cpu.local("download", {"preset": "tiny", "dataset": "embedded"})
    assert result["exit_code"] == 0
    assert list((volume_root / "nanochat-data" / "base_data" / "embedded").glob("*.parquet"))


def test_a_failing_stage_raises_so_modal_retries(base_dir, volume_root):
    # A failure (not bad input) must raise: that is what makes Modal apply the retry policy.
    # Port 9 on 127.0.0.1 refuses connections: the download fails, offline.
    knobs = {"preset": "tiny", "dataset": "climbmix", "shards": 1}
    knobs |= {"source": "http://127.0.0.1:9", "args": "--retries=1 --retry-delay=0"}
    with pytest.raises(modal_app.StageFailed, match="download exited with code 1"):
        modal_app.run_stage("download", knobs)


def test_usage_errors_are_returned_not_retried(base_dir, volume_root):
    result = modal_app.run_stage(
        "download", {"preset": "tiny", "dataset": "climbmix", "args": "--shards=0"}
    )
    assert result["exit_code"] == 2


def test_checkpoint_committer_commits_when_a_checkpoint_completes(base_dir, volume_root):
    modal_volumes.link_base_dir(base_dir, volume_root)
    commits = []
    committer = modal_volumes.CheckpointCommitter(base_dir, commit=commits.append, poll_s=3600)
    committer.check()
    assert commits == []
    ckpt = base_dir / "base_checkpoints" / "d4"
    ckpt.mkdir()
    (ckpt / "model_000010.pt").write_bytes(b"x")
    committer.check()
    assert commits == []  # the model alone is not a complete checkpoint
    (ckpt / "meta_000010.json").write_text("{}")
    committer.check()
    assert commits == [("nanochat-checkpoints",)]
    committer.check()
    assert commits == [("nanochat-checkpoints",)]


def test_link_base_dir_refuses_to_hide_real_data(base_dir, volume_root):
    (base_dir / "tokenizer").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="is not a link to the volume"):
        modal_volumes.link_base_dir(base_dir, volume_root)


def test_remote_command_reads_the_container_and_resumes(base_dir):
    remote = plan("pretrain", preset="quick", depth="12", backend="modal", dry_run=True)
    cmd = modal_app.remote_command(remote.stage, modal_backend.payload(remote), base_dir)
    # No GPU in this container: one process; the same flags the local backend would pass.
    local_cmd = plan("pretrain", preset="quick", depth="12", gpus="1", dry_run=True).command
    assert cmd.argv[cmd.argv.index("scripts.base_train") + 1 :] == local_cmd.argv[3:]
    assert cmd.env[modal_app.RESUME_ENV] == "auto"
    assert cmd.env["NANOCHAT_BASE_DIR"] == str(base_dir)


def test_web_command_listens_for_modals_proxy(base_dir):
    cmd = modal_app.web_command({"preset": "tiny", "source": "sft"}, base_dir)
    assert cmd.argv[:3] == ["python", "-m", "scripts.chat_web"]
    assert "--source=sft" in cmd.argv and "--host=0.0.0.0" in cmd.argv
    assert f"--port={modal_app.WEB_PORT}" in cmd.argv


def test_dry_run_wraps_the_local_command():
    local_out = run_cli(["make", "tokenizer", "PRESET=tiny", "DRY_RUN=1"])
    modal_out = run_cli(["make", "tokenizer", "PRESET=tiny", "BACKEND=modal", "DRY_RUN=1"])
    assert local_out.returncode == modal_out.returncode == 0, modal_out.stderr
    local_line = local_out.stdout.strip().splitlines()[-1]
    lines = modal_out.stdout.strip().splitlines()
    assert lines[-1] == local_line
    assert lines[0].startswith(
        "# modal: app nanochat, function stage_tokenizer: no GPU (CPU container), 16 cores, 64 GiB"
    )
    assert any(line.startswith("# estimate: tokenizer") for line in lines)


def test_dry_run_of_a_gpu_preset_shows_gpus_and_cost():
    text = modal_backend.describe(
        plan("pretrain", preset="speedrun", backend="modal", dry_run=True)
    )
    assert "function stage_pretrain: GPU H100:8, 64 cores, 256 GiB, timeout 24 h, retries 3" in text
    assert "torchrun --standalone --nproc_per_node=8 -m scripts.base_train" in text
    assert "~$" in text


def test_secret_values_never_appear_in_a_dry_run(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value-123")
    monkeypatch.setenv("HF_TOKEN", "hf-secret-value-456")
    text = modal_backend.describe(plan("pretrain", preset="quick", backend="modal", dry_run=True))
    assert "WANDB_API_KEY" in text and "HF_TOKEN" in text
    assert "secret-value" not in text


def test_no_token_gives_one_line_telling_how_to_log_in():
    result = run_cli(
        [str(Path(sys.executable).parent / "invoke"), "tokenizer", "--backend", "modal"],
        env=NO_TOKEN,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"error: {modal_backend.LOGIN_HELP}"


def test_volume_paths_map_to_their_volume():
    assert modal_backend._volume_for("base_checkpoints/d12") == (
        "nanochat-checkpoints",
        "base_checkpoints/d12",
    )
    assert modal_backend._volume_for("/tokenizer")[0] == "nanochat-data"
    with pytest.raises(Exception, match="PATH must start with an artifact folder"):
        modal_backend._volume_for("etc/passwd")


def test_volume_get_without_path_is_a_usage_error():
    result = run_cli(["make", "volume-get"], env=NO_TOKEN)
    assert result.returncode == 2
    assert "error: volume-get needs PATH=" in result.stderr.splitlines()[0]


@pytest.mark.skipif(
    not (os.environ.get("MODAL_TOKEN_ID") or Path("~/.modal.toml").expanduser().exists()),
    reason="no Modal credentials here: the image build, containers, volume commits and the "
    "web endpoint on Modal were not run",
)
def test_tiny_tokenizer_on_modal_for_real(base_dir):
    result = run_cli(["make", "tokenizer", "PRESET=tiny", "BACKEND=modal"], timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]


# --- the same dependencies on the laptop and in the container ---------------------------

DEPS_PROBE = textwrap.dedent("""
    import json, sys, warnings
    sys.path.insert(0, {repo!r})
    import modal
    warnings.simplefilter("error", modal.exception.DeprecationError)
    from modal._utils.async_utils import synchronizer
    import backends.modal_app as m
    functions = {{**m.STAGE_FUNCTIONS, "stage_on_cpu": m.stage_on_cpu,
                 "speedrun_remote": m.speedrun_remote, "chat_web": m.chat_web}}
    out = {{}}
    for name, fn in functions.items():
        # What Modal's container entrypoint compares with the deployed function's ids.
        deps = synchronizer._translate_in(fn)._deps_(only_explicit_mounts=True)
        out[name] = [repr(d) if "Secret.from_name" in repr(d) else type(d).__name__
                     for d in deps]
    print(json.dumps({{"deps": out, "injected": m.dict_secret_values()}}))
""")

# name -> (the laptop's environment, its .env, what the named secret holds)
SECRET_SETUPS = {
    "none": ({}, "", {}),
    "environment only": ({"WANDB_API_KEY": "w-env"}, "", {}),
    ".env only": ({}, "HF_TOKEN=h-file\n", {}),
    "named only": ({"NANOCHAT_MODAL_SECRET": "team"}, "", {}),
    "named, holding a key the laptop lacks": (
        {"NANOCHAT_MODAL_SECRET": "team"},
        "",
        {"WANDB_API_KEY": "w-named"},
    ),
    "both": ({"NANOCHAT_MODAL_SECRET": "team"}, "WANDB_API_KEY=w-file\n", {"HF_TOKEN": "h"}),
}


def _deps(env: dict[str, str]) -> dict:
    result = run_cli([sys.executable, "-c", DEPS_PROBE.format(repo=str(REPO))], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setup", list(SECRET_SETUPS))
def test_every_function_declares_the_same_dependencies_in_the_container(tmp_path, setup):
    """Modal hydrates a function's dependencies by position: the container's import must
    declare exactly the laptop's, or it dies with "Function has N dependencies but container
    got M object ids". The container has no .env and none of the laptop's variables; it has
    what Modal injects (the secrets' variables and the function's env)."""
    environ, dotenv, named = SECRET_SETUPS[setup]
    (tmp_path / ".env").write_text(dotenv)
    laptop_env = {**NO_TOKEN, **environ, "NANOCHAT_DOTENV": str(tmp_path / ".env")}
    laptop = _deps(laptop_env)
    # Modal injects the dict secret's variables (as the laptop made it) and the named one's.
    injected = {**laptop["injected"], **named}
    assert set(laptop["injected"]) - {"NANOCHAT_MODAL_SECRET"} == set(
        load_secrets(tmp_path / ".env", environ)
    )
    container_env = {
        **NO_TOKEN,
        **injected,
        "MODAL_IS_REMOTE": "1",
        "NANOCHAT_DOTENV": str(tmp_path / "absent"),
        modal_backend.WEB_KNOBS_ENV: "{}",
    }
    container = _deps(container_env)
    assert container["deps"] == laptop["deps"]
    pretrain = laptop["deps"]["pretrain"]
    wanted = ["_Secret"]  # the dict secret, always there (possibly empty)
    if environ.get("NANOCHAT_MODAL_SECRET"):
        wanted.append("modal.Secret.from_name('team')")
    assert pretrain[: pretrain.index("_Image")] == wanted


# --- chat-web on Modal: the GPU, the auth and the idle window the user asked for ------------

WEB_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import modal
    from modal._utils.async_utils import synchronizer
    calls = {{}}
    original = modal.App.function
    def spy(self, *args, **kwargs):
        decorate = original(self, *args, **kwargs)
        def record(f):
            fn = decorate(f)
            calls[getattr(f, "__name__", "web endpoint")] = kwargs  # a web endpoint is a partial
            return fn
        return record
    modal.App.function = spy
    import backends.modal_app as m
    web = synchronizer._translate_in(m.chat_web)
    options = calls["web endpoint"]
    print(json.dumps({{
        "gpu": m.chat_web._spec_.gpus, "cpu": m.chat_web._spec_.cpu,
        "proxy_auth": web._webhook_config.requires_proxy_auth,
        "port": web._webhook_config.web_server_port,
        "scaledown_window": options.get("scaledown_window"),
        "max_containers": options.get("max_containers"),
        "orchestrator_nonpreemptible":
            m.speedrun_remote._spec_.scheduler_placement.nonpreemptible,
    }}))
""")


@pytest.mark.parametrize(
    "knobs, key, gpu, cpu, proxy_auth",
    [
        ({"preset": "tiny", "gpu": "cpu"}, "", None, 4.0, True),  # tiny: a CPU container
        ({"preset": "speedrun", "gpu": "H100:8"}, "", "H100", 8.0, True),  # one GPU serves
        ({}, "k-123", "A100-80GB", 8.0, False),  # the server checks NANOCHAT_API_KEY itself
    ],
)
def test_chat_web_function_follows_the_knobs_and_is_never_open(knobs, key, gpu, cpu, proxy_auth):
    env = {**NO_TOKEN, modal_backend.WEB_KNOBS_ENV: json.dumps(knobs), "NANOCHAT_API_KEY": key}
    result = run_cli([sys.executable, "-c", WEB_PROBE.format(repo=str(REPO))], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["gpu"], found["cpu"], found["proxy_auth"]) == (gpu, cpu, proxy_auth)
    assert found["port"] == STAGES_BY_NAME["chat-web"].web_port
    # Kept warm between requests (no model reload per idle minute), one container billed.
    assert (found["scaledown_window"], found["max_containers"]) == (600, 1)
    assert found["orchestrator_nonpreemptible"] is True


def test_chat_web_runs_with_the_threads_its_dry_run_prints(base_dir):
    the_plan = plan("chat-web", preset="tiny", backend="modal", dry_run=True)
    cmd = modal_app.web_command(modal_backend.payload(the_plan), base_dir)
    assert cmd.env["OMP_NUM_THREADS"] == the_plan.command.env["OMP_NUM_THREADS"] == "4"
    assert cmd.argv[-2:] == ["--host=0.0.0.0", "--port=8000"]


def test_chat_web_dry_run_shows_the_container_port_and_auth(capsys):
    text = modal_backend.describe(plan("chat-web", preset="tiny", backend="modal", dry_run=True))
    assert "function chat_web: no GPU (CPU container), 4 cores, 8 GiB" in text
    assert "a web endpoint (port 8000 behind Modal's HTTPS URL), one container, kept 10 min" in text
    assert "auth: Modal proxy auth: requests need the headers Modal-Key and Modal-Secret" in text
    text = modal_backend.describe(
        plan("chat-web", preset="speedrun", backend="modal", gpu="H100:8", dry_run=True)
    )
    assert "function chat_web: GPU H100, 8 cores, 32 GiB" in text


def test_chat_cli_on_modal_needs_a_prompt(base_dir):
    the_plan = plan("chat-cli", preset="tiny", backend="modal", dry_run=True)
    with pytest.raises(UsageError, match="cannot read your keyboard: give it a prompt"):
        modal_backend.check_interactive(the_plan)
    prompted = plan("chat-cli", preset="tiny", backend="modal", args="-p Hi", dry_run=True)
    modal_backend.check_interactive(prompted)  # fine: one reply, streamed back


# --- threads: what the dry run prints is what the container runs ----------------------------


def image_env() -> dict[str, str]:
    """The ENV the Dockerfile sets (what every container starts with), PATH aside."""
    found = {}
    for line in (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                found[key] = value
    found.pop("PATH", None)
    return found


@pytest.mark.parametrize("stage_name, threads", [("pretrain", "4"), ("tokenizer", "16")])
def test_a_cpu_container_runs_the_threads_its_dry_run_prints(
    monkeypatch, base_dir, stage_name, threads
):
    the_plan = plan(stage_name, preset="tiny", backend="modal", dry_run=True)
    assert the_plan.command.env["OMP_NUM_THREADS"] == threads  # the container's cores
    knobs = modal_backend.payload(the_plan)
    for key, value in image_env().items():  # now as the container starts
        monkeypatch.setenv(key, value)
    stage = STAGES_BY_NAME[stage_name]
    assert modal_app.remote_command(stage, knobs, base_dir).env["OMP_NUM_THREADS"] == threads
    # Computed in the container from the requested size too (not from os.cpu_count(), which
    # is the host's), so even a step without the carried value agrees.
    bare = {k: v for k, v in knobs.items() if k != "env"}
    assert modal_app.remote_command(stage, bare, base_dir).env["OMP_NUM_THREADS"] == threads


def test_stages_are_waited_for_with_spawn_get_not_remote(monkeypatch):
    """A .remote() call's result expires after 24 h; a long stage with retries outlives it."""
    waited = []

    class Call:
        def get(self):
            waited.append("get")
            return {"exit_code": 0}

    monkeypatch.setattr(modal_app, "spawn_stage", lambda stage, knobs, gpu: Call())
    assert modal_app.call_stage(STAGES_BY_NAME["report"], {}, None) == {"exit_code": 0}
    assert waited == ["get"]
