"""The CORE eval bundles: their format (nanochat/evaluation/eval_bundle.py), getting the DCLM
one in place (nanochat/evaluation/bundle_fetch.py) and the offline one
(nanochat/offline/embedded_core.py).

Downloads run against a real HTTP server on 127.0.0.1 serving a small zip with the official
layout; the embedded bundle is built from the real embedded corpus and from a synthetic one.
CPU, offline. Scoring and stage base-eval are in test_core_eval.py.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import inspect
import io
import json
import os
import subprocess
import sys
import threading
import zipfile

import pytest
from conftest import REPO
from helpers.builders import synthetic_corpus

from nanochat.evaluation import bundle_fetch, eval_bundle
from nanochat.evaluation.eval_bundle import (
    BundleError,
    LMExample,
    MCExample,
    SchemaExample,
    TaskSpec,
)
from nanochat.offline import embedded_core

# ----------------------------------------------------------------------------- bundle format

CORE_YAML = """\
icl_tasks:
-
  label: toy_mc
  dataset_uri: world_knowledge/toy_mc.jsonl # a comment
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: " # this separates questions from answers
  has_categories: true
-
  label: toy_lm
  dataset_uri: toy_lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
META_CSV = (
    "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,"
    "Description\n"
    'toy_mc,world knowledge,multiple choice,1,2,25,,"Four choices, one right."\n'
    "toy_lm,language understanding,language modeling,0,2,0,,Exact match.\n"
    "unused_task,safety,multiple choice,3,9,33.3,,Not in core.yaml.\n"
)
MC_LINES = [
    {"query": "2+2=", "choices": ["4", "5", "6", "7"], "gold": 0},
    {"query": "3+3=", "choices": ["5", "6", "7", "8"], "gold": 1},
]
LM_LINES = [{"context": "a b c", "continuation": "d"}, {"context": "1 2 3 ", "continuation": "4"}]


def bundle_zip(prefix: str = "eval_bundle/", skip: str | None = None) -> bytes:
    """A small archive with the official layout (one top folder)."""
    files = {
        "core.yaml": CORE_YAML,
        "eval_meta_data.csv": META_CSV,
        "eval_data/world_knowledge/toy_mc.jsonl": "".join(json.dumps(x) + "\n" for x in MC_LINES),
        "eval_data/toy_lm.jsonl": "".join(json.dumps(x) + "\n" for x in LM_LINES),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            if name != skip:
                archive.writestr(prefix + name, text)
    return buffer.getvalue()


def test_official_layout_loads_into_dataclasses(tmp_path):
    with zipfile.ZipFile(io.BytesIO(bundle_zip())) as archive:
        archive.extractall(tmp_path)
    bundle = eval_bundle.load_bundle(tmp_path / "eval_bundle")
    mc, lm = bundle.tasks
    assert mc == TaskSpec(
        "toy_mc", "multiple_choice", "world_knowledge/toy_mc.jsonl", 1, "\nAnswer: ", 25.0
    )
    assert lm == TaskSpec("toy_lm", "language_modeling", "toy_lm.jsonl", 0, " ", 0.0)
    assert bundle.examples(mc) == [
        MCExample("2+2=", ("4", "5", "6", "7"), 0),
        MCExample("3+3=", ("5", "6", "7", "8"), 1),
    ]
    assert bundle.examples(lm)[1] == LMExample("1 2 3 ", "4")


def task_yaml(**fields) -> str:
    entry = {
        "label": "x",
        "dataset_uri": "x.jsonl",
        "num_fewshot": "[0]",
        "icl_task_type": "schema",
    }
    entry.update(fields)
    return "icl_tasks:\n-\n" + "".join(f"  {k}: {v}\n" for k, v in entry.items() if v is not None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (task_yaml(icl_task_type="generation_task_with_answers"), "icl_task_type"),
        (task_yaml(num_fewshot="[0, 1]"), "num_fewshot"),
        (task_yaml(dataset_uri="../x.jsonl"), "relative"),
        (task_yaml(dataset_uri=None), "lacks dataset_uri"),
        (task_yaml(label="nobaseline"), "no row"),
        ("tasks: []\n", "icl_tasks"),
        (task_yaml(label="'unterminated"), "not valid YAML: line 7, column 1: while scanning"),
        (task_yaml(label="x\n  label: x"), "line 4, column 3: duplicate key 'label'"),
    ],
)
def test_malformed_core_yaml_is_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        eval_bundle.parse_tasks(text, {"x": 25.0})


@pytest.mark.parametrize(
    ("task_type", "record", "message"),
    [
        ("multiple_choice", {"query": "q", "choices": ["a"], "gold": 0}, "at least two"),
        ("multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": 2}, "gold"),
        ("schema", {"context_options": ["a", "b"], "gold": 0}, "continuation"),
        ("language_modeling", {"context": "c", "continuation": ""}, "empty"),
    ],
)
def test_malformed_examples_are_rejected_with_their_line(tmp_path, task_type, record, message):
    path = tmp_path / "x.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n")  # a blank line first: skipped, counted
    with pytest.raises(ValueError, match=message) as info:
        eval_bundle.read_examples(path, task_type)
    assert f"{path}:2:" in str(info.value)


# ----------------------------------------------------------------------------- download


class BundleServer:
    """ThreadingHTTPServer on 127.0.0.1; ``script`` is a list of answers used one per
    request (the last repeats): ("ok", body) | ("truncate", body, n, with_length) |
    ("status", code)."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests += 1
                action = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if action[0] == "status":
                    self.send_error(action[1])
                    return
                body = action[1]
                n, with_length = (
                    (action[2], action[3]) if action[0] == "truncate" else (len(body), True)
                )
                self.send_response(200)
                if with_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:n])
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = BundleServer()
    yield srv
    srv.close()


FAST = {"retries": 3, "retry_delay": 0.01, "timeout": 5.0}


def test_download_verifies_records_and_extracts(server, base_dir):
    body = bundle_zip()
    server.script = [("ok", body)]
    folder = bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    assert folder == base_dir / "eval_bundle" / "dclm" and server.requests == 1
    digest = hashlib.sha256(body).hexdigest()
    assert (base_dir / "eval_bundle" / "dclm.zip").read_bytes() == body
    assert (base_dir / "eval_bundle" / "dclm.zip.sha256").read_text().split()[0] == digest
    record = json.loads((folder / "bundle.json").read_text())
    assert record["sha256"] == digest and record["source"] == server.url
    bundle = bundle_fetch.ensure(base_dir, "dclm", server.url, **FAST)
    assert [t.label for t in bundle.tasks] == ["toy_mc", "toy_lm"]
    leftovers = [p.name for p in (base_dir / "eval_bundle").iterdir() if p.name.startswith(".dclm")]
    assert leftovers == []


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "no-length"])
def test_a_truncated_zip_is_rejected_and_fetched_again(server, base_dir, with_length, capsys):
    body = bundle_zip()
    server.script = [("truncate", body, len(body) // 2, with_length), ("ok", body)]
    folder = bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    assert server.requests == 2
    assert eval_bundle.load_bundle(folder).tasks[0].label == "toy_mc"
    assert "retry 2/3" in capsys.readouterr().err


def test_an_incomplete_archive_and_a_404_fail_in_one_line(server, base_dir):
    server.script = [("ok", bundle_zip(skip="eval_data/toy_lm.jsonl"))]
    with pytest.raises(BundleError, match="toy_lm.jsonl .* is missing.*gave up after 3"):
        bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    assert server.requests == 3
    assert not (base_dir / "eval_bundle" / "dclm").exists()
    assert not (base_dir / "eval_bundle" / "dclm.zip").exists()
    server.script, server.requests = [("status", 404)], 0
    with pytest.raises(BundleError, match="HTTP 404"):
        bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    assert server.requests == 1  # not retried


def test_a_complete_bundle_is_not_fetched_again(server, base_dir):
    server.script = [("ok", bundle_zip())]
    folder = bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    bundle_fetch.ensure_dclm(base_dir, None, **FAST)  # the official URL is not tried either
    assert server.requests == 1
    # a damaged folder is re-extracted from the kept archive, still without the network
    (folder / "eval_data" / "toy_lm.jsonl").unlink()
    bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    assert server.requests == 1 and (folder / "eval_data" / "toy_lm.jsonl").is_file()
    # a damaged archive (hash differs from the record) is fetched again
    (folder / "bundle.json").unlink()
    (base_dir / "eval_bundle" / "dclm.zip").write_bytes(b"garbage")
    bundle_fetch.ensure_dclm(base_dir, server.url, **FAST)
    assert server.requests == 2


def test_a_local_zip_source(tmp_path, base_dir):
    good = tmp_path / "mirror.zip"
    good.write_bytes(bundle_zip(prefix=""))  # files at the archive's root work too
    folder = bundle_fetch.ensure_dclm(base_dir, str(good))
    assert eval_bundle.load_bundle(folder).tasks[1].label == "toy_lm"
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bundle_zip()[:100])
    with pytest.raises(BundleError, match="not a complete eval bundle"):
        bundle_fetch.ensure_dclm(tmp_path / "other", str(bad))
    with pytest.raises(BundleError, match="no such file"):
        bundle_fetch.ensure_dclm(tmp_path / "other", str(tmp_path / "missing.zip"))


# ----------------------------------------------------------------------------- embedded bundle


@pytest.fixture(scope="module")
def corpus():
    from nanochat.offline import embedded_corpus

    return embedded_corpus.split_corpus(embedded_corpus.build_corpus())


@pytest.fixture(scope="module")
def embedded_files(corpus):
    return embedded_core.build_files(*corpus)


def test_embedded_bundle_is_deterministic(corpus, embedded_files):
    assert embedded_core.build_files(*corpus) == embedded_files


def test_embedded_bundle_does_not_depend_on_the_hash_seed():
    code = (
        "import random\n"
        + inspect.getsource(synthetic_corpus)
        + "from nanochat.offline import embedded_core as e\n"
        + "print(e.files_digest(e.build_files(*synthetic_corpus())))\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    here = embedded_core.files_digest(embedded_core.build_files(*synthetic_corpus()))
    assert digests == {here}


def test_embedded_bundle_has_a_few_hundred_items_per_type(tmp_path, embedded_files):
    embedded_core.write_bundle(tmp_path / "embedded", embedded_files)
    bundle = eval_bundle.load_bundle(tmp_path / "embedded")  # the official loader
    per_type: dict[str, int] = {}
    for task in bundle.tasks:
        examples = bundle.examples(task)
        per_type[task.task_type] = per_type.get(task.task_type, 0) + len(examples)
        for example in examples:
            if isinstance(example, MCExample | SchemaExample):
                options = (
                    example.choices if isinstance(example, MCExample) else example.context_options
                )
                assert len(set(options)) == len(options), example
    assert set(per_type) == set(eval_bundle.TASK_TYPES)
    assert all(n >= 200 for n in per_type.values()), per_type
    baselines = {t.label: t.random_baseline for t in bundle.tasks}
    assert baselines == {
        "sentence_ending": 25.0, "next_word": 25.0, "context_swap": 50.0,
        "phrase_completion": 0.0, "echo": 0.0,
    }  # fmt: skip
    meta = list(
        csv.DictReader(io.StringIO((tmp_path / "embedded" / "eval_meta_data.csv").read_text()))
    )
    assert meta[0].keys() >= {"Eval Task", "Random baseline", "#datapoints", "Description"}
    record = json.loads((tmp_path / "embedded" / "bundle.json").read_text())
    assert record["sha256"] == embedded_core.files_digest(embedded_files)


def test_embedded_items_come_from_the_validation_split(corpus, embedded_files):
    train, val = corpus
    val_text = " ".join(" ".join(t.split()) for t in val)
    for line in embedded_files["eval_data/stdlib/sentence_ending.jsonl"].decode().splitlines()[:50]:
        item = json.loads(line)
        assert f"{item['query']} {item['choices'][item['gold']]}" in val_text


def test_ensure_embedded_builds_once(base_dir, monkeypatch):
    from nanochat.offline import embedded_corpus

    calls = []
    monkeypatch.setattr(embedded_corpus, "build_corpus", lambda: calls.append(1) or [])
    monkeypatch.setattr(embedded_corpus, "split_corpus", lambda corpus: synthetic_corpus())
    folder = embedded_core.ensure_embedded_bundle(base_dir)
    assert folder == base_dir / "eval_bundle" / "embedded" and calls == [1]
    assert bundle_fetch.ensure(base_dir, "embedded").name == "embedded" and calls == [1]
    # a bundle from another generator version is rebuilt
    record = json.loads((folder / "bundle.json").read_text())
    (folder / "bundle.json").write_text(json.dumps({**record, "generator": 0}))
    embedded_core.ensure_embedded_bundle(base_dir)
    assert calls == [1, 1]
    with pytest.raises(BundleError, match="--source applies to the dclm bundle only"):
        bundle_fetch.ensure(base_dir, "embedded", "http://example.invalid/x.zip")
