"""`make export` and `make push-hub` as a user runs them.

The done-when in miniature: a checkpoint, `make export SOURCE=base`, then a three-line
transformers script generates what `make chat-cli` says at temperature 0. push-hub goes
through huggingface_hub's real upload code against a stand-in of the Hub's upload API on
127.0.0.1 (create the repository, check the card's YAML, pre-upload, commit); the real Hub
was not reached. Bad input is one line and exit 2, before anything is read or sent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli
from helpers.chat_server import REPLY_TEXT, build_chat_checkpoint
from helpers.hub import UploadHub

pytest.importorskip("transformers")  # installed by the dev extras (train)

MAKE = ["make", "--no-print-directory"]
THREE_LINES = """
import sys; from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True); model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True, return_tensors="pt"); print(tok.decode(model.generate(**ids, max_new_tokens=32, do_sample=False)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""  # noqa: E501


@pytest.fixture
def hub():
    stand_in = UploadHub()
    yield stand_in
    stand_in.close()


def test_transformers_generates_what_chat_cli_says(base_dir):
    build_chat_checkpoint(base_dir, tool=False)
    result = run_cli([*MAKE, "export", "SOURCE=base"], timeout=300)
    assert result.returncode == 0, result.stderr
    folder = base_dir / "export" / "base-d2"
    assert "max |logit difference|" in result.stderr and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["nanochat_export"]["kind"] == "base" and config["nanochat_export"]["step"] == 1
    question = "What is 2+3?"
    chat = run_cli([*MAKE, "chat-cli", "SOURCE=base", f"ARGS=-p '{question}' -t 0"])
    assert chat.returncode == 0, chat.stderr
    ours = chat.stdout.strip()
    theirs = subprocess.run(
        [sys.executable, "-c", THREE_LINES, str(folder), question],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert theirs.returncode == 0, theirs.stderr
    assert ours == REPLY_TEXT and theirs.stdout.strip() == ours


def test_push_hub_uploads_the_export_privately(base_dir, hub):
    build_chat_checkpoint(base_dir, tool=False)
    assert run_cli([*MAKE, "export", "SOURCE=base", "DEST=mine"], timeout=300).returncode == 0
    folder = base_dir / "export" / "mine"
    env = {"HF_TOKEN": "hf_stand_in", "HF_ENDPOINT": hub.url}
    result = run_cli([*MAKE, "push-hub", "REPO=me/tiny-chat"], env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert hub.created == [
        {"name": "tiny-chat", "organization": "me", "visibility": "private", "type": "model"}
    ]
    assert hub.files("me/tiny-chat") == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "hf_stand_in" not in result.stdout + result.stderr  # the token is never printed
    # An older upload's file the folder no longer has goes; --public makes the repo public.
    hub.repos["me/tiny-chat"]["files"]["model-00001-of-00002.safetensors"] = b"stale"
    # A crashed export's work folder (newer, marked, never checked) is not a candidate.
    crashed = shutil.copytree(folder, base_dir / "export" / ".mine.export-crashed")
    (crashed / "README.md").write_text("---\ntags: [unchecked]\n---\n")
    public = run_cli([*MAKE, "push-hub", "REPO=me/tiny-chat", "ARGS=--public"], env=env)
    assert public.returncode == 0, public.stderr
    assert hub.files("me/tiny-chat") == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert hub.repos["me/tiny-chat"]["private"] is False and len(hub.created) == 1
    hub.refuse = 401  # a bad token: one line, exit 1
    refused = run_cli([*MAKE, "push-hub", "REPO=me/tiny-chat"], env=env)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error")]
    assert refused.returncode == 1 and len(errors) == 1 and "401" in errors[0], refused.stderr


@pytest.mark.parametrize(
    "argv, env, says",
    [
        (["push-hub"], {}, "make push-hub needs REPO="),
        (["push-hub", "REPO=me/x"], {}, "make push-hub needs HF_TOKEN"),
        (["push-hub", "REPO=me/x"], {"HF_TOKEN": "t"}, "no export under"),
        (["push-hub", "REPO=not a repo"], {"HF_TOKEN": "t"}, "expected a Hub repository"),
        (["export", "SOURCE=sft"], {}, "no sft checkpoint"),
        (["export", "ARGS=--dtype=int8"], {}, "invalid choice: 'int8'"),
        (["push-hub", "REPO=me/x", "ARGS=--bogus"], {"HF_TOKEN": "t"}, "unrecognized arguments"),
        (["export", "DEST=/tmp/x", "BACKEND=docker"], {}, "BACKEND=docker cannot see"),
        (["export", "DEST=../x", "BACKEND=modal", "DRY_RUN=1"], {}, "BACKEND=modal cannot"),
    ],
)
def test_bad_input_is_one_line_before_any_work(base_dir, hub, argv, env, says):
    result = run_cli([*MAKE, *argv], env={"HF_ENDPOINT": hub.url, **env})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()  # the launcher's "error: ..." or the script's parser's
    errors = [line for line in lines if "error:" in line and not line.startswith("make:")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert hub.requests == []  # nothing was sent


def test_dry_runs_print_the_exact_commands(base_dir):
    export = run_cli([*MAKE, "export", "SOURCE=sft", "DEST=mine", "DRY_RUN=1"])
    assert export.returncode == 0, export.stderr
    assert "python -m scripts.export --source=sft --dest=mine" in export.stdout
    push = run_cli([*MAKE, "push-hub", "REPO=me/x", "DRY_RUN=1"])  # no token needed to look
    assert push.returncode == 0, push.stderr
    assert "python -m scripts.push_hub --repo=me/x" in push.stdout
    assert not (base_dir / "export").exists()
