"""Stage 1 (scripts.download over nanochat.data.dataset): downloads against a real local HTTP
server, the embedded corpus, custom folder conversion and every usage error. CPU, offline, a
few seconds."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from nanochat.data import dataset, download, shards
from nanochat.offline import embedded_corpus
from scripts import download as download_cli

VAL = dataset.REMOTE_DATASETS["climbmix"].validation_index  # 6542


# ----------------------------------------------------------------------------- fixtures


def shard_bytes(tmp_path: Path, index: int, docs: int = 40) -> bytes:
    path = tmp_path / "fixture_shards" / shards.shard_name(index)
    shards.write_shard(
        path, [f"shard {index} document {j}: " + "lorem ipsum " * 20 for j in range(docs)]
    )
    return path.read_bytes()


class ScriptedServer:
    """A ThreadingHTTPServer on 127.0.0.1 whose answer per path is scripted.

    ``routes[path]`` is a list of actions used one per request; the last one repeats.
    Actions: ("ok", body) | ("status", code) | ("drop",) | ("truncate", body, n, with_length)
    | ("stall", body, n). Unrouted paths get 404. Every request is recorded.
    """

    def __init__(self):
        self.routes: dict[str, list[tuple]] = {}
        self.requests: list[tuple[str, dict]] = []
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        self.stalled = threading.Event()  # set once a stall has sent its partial body
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server._lock:
                    server.requests.append((self.path, dict(self.headers)))
                    script = server.routes.get(self.path)
                    action = (script.pop(0) if len(script) > 1 else script[0]) if script else None
                if action is None:
                    self.send_error(404)
                    return
                kind = action[0]
                if kind == "ok":
                    self._head(200, len(action[1]))
                    self.wfile.write(action[1])
                elif kind == "status":
                    self.send_error(action[1])
                elif kind == "drop":
                    self.close_connection = True  # no status line at all
                elif kind == "truncate":
                    body, n, with_length = action[1:]
                    self._head(200, len(body) if with_length else None)
                    self.wfile.write(body[:n])
                    self.close_connection = True
                elif kind == "stall":
                    body, n = action[1:]
                    self._head(200, len(body))
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    server.stalled.set()
                    server.release.wait(20)
                    self.close_connection = True

            def _head(self, code, length):
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream")
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/climbmix"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def route(self, index: int, *actions: tuple) -> None:
        self.routes[f"/climbmix/{shards.shard_name(index)}"] = list(actions)

    def count(self, index: int) -> int:
        path = f"/climbmix/{shards.shard_name(index)}"
        return sum(1 for p, _ in self.requests if p == path)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ScriptedServer()
    yield srv
    srv.close()


@pytest.fixture
def base(tmp_path, monkeypatch):
    root = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return root


@pytest.fixture
def good(tmp_path):
    """Valid fixture shard bytes for the three shards a ``--shards 2`` run asks for."""
    return {i: shard_bytes(tmp_path, i) for i in (0, 1, VAL)}


def download_args(server, *extra: str) -> list[str]:
    return [
        "--dataset", "climbmix", "--shards", "2", "--source", server.url,
        "--retry-delay", "0.01", "--timeout", "2", "--workers", "3", *extra,
    ]  # fmt: skip


def folder_of(base: Path) -> Path:
    return shards.data_dir(base, "climbmix")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.is_dir() else []


def serve_all(server, good):
    for index, body in good.items():
        server.route(index, ("ok", body))


# ----------------------------------------------------------------------------- download


def test_download_fetches_training_and_validation_shards(server, base, good, capsys):
    serve_all(server, good)
    assert download_cli.main(download_args(server)) == 0
    folder = folder_of(base)
    assert [p.name for p in shards.list_shards(folder)] == [
        "shard_00000.parquet", "shard_00001.parquet", f"shard_{VAL:05d}.parquet",
    ]  # fmt: skip
    for index, body in good.items():
        assert (folder / shards.shard_name(index)).read_bytes() == body
    train, val = shards.split_shards(folder)
    assert val.name == shards.shard_name(VAL) and len(train) == 2
    out = capsys.readouterr().out
    assert "3 shard(s) fetched, 0 skipped" in out
    assert temp_files(folder) == []
    # the server saw a User-Agent and no token (none set)
    headers = server.requests[0][1]
    assert headers["User-Agent"].startswith("nanochat")
    assert "Authorization" not in headers


def test_retries_server_errors_and_dropped_connections(server, base, good):
    serve_all(server, good)
    server.route(0, ("status", 500), ("status", 503), ("ok", good[0]))
    server.route(1, ("drop",), ("drop",), ("ok", good[1]))
    server.route(VAL, ("status", 429), ("ok", good[VAL]))
    assert download_cli.main(download_args(server)) == 0
    assert (server.count(0), server.count(1), server.count(VAL)) == (3, 3, 2)
    for index, body in good.items():
        assert (folder_of(base) / shards.shard_name(index)).read_bytes() == body


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "no-length"])
def test_truncated_download_is_retried(server, base, good, with_length, capsys):
    serve_all(server, good)
    server.route(0, ("truncate", good[0], len(good[0]) // 2, with_length), ("ok", good[0]))
    assert download_cli.main(download_args(server)) == 0
    assert server.count(0) == 2
    assert (folder_of(base) / "shard_00000.parquet").read_bytes() == good[0]
    assert "retry 2/5" in capsys.readouterr().err


def test_invalid_content_is_verified_before_rename_and_retried(server, base, good, capsys):
    serve_all(server, good)
    server.route(1, ("ok", b"<html>rate limited</html>"), ("ok", good[1]))
    assert download_cli.main(download_args(server)) == 0
    assert server.count(1) == 2
    assert "invalid content" in capsys.readouterr().err
    assert shards.verify_shard(folder_of(base) / "shard_00001.parquet") is None


def test_404_fails_fast_and_names_the_shard(server, base, good, capsys):
    serve_all(server, good)
    del server.routes["/climbmix/shard_00001.parquet"]
    assert download_cli.main(download_args(server)) == 1
    assert server.count(1) == 1  # a 404 is not retried
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: shard 1 ")]
    assert len(lines) == 1
    assert "404" in lines[0] and f"{server.url}/shard_00001.parquet" in lines[0]
    folder = folder_of(base)
    assert not (folder / "shard_00001.parquet").exists()
    assert (folder / "shard_00000.parquet").exists()  # the others still landed
    assert temp_files(folder) == []


def test_gives_up_after_the_last_attempt(server, base, good, capsys):
    serve_all(server, good)
    server.route(VAL, ("status", 503))
    assert download_cli.main(download_args(server, "--retries", "3")) == 1
    assert server.count(VAL) == 3
    err = capsys.readouterr().err
    assert f"error: shard {VAL} " in err and "gave up after 3 attempts" in err
    assert not (folder_of(base) / shards.shard_name(VAL)).exists()


def test_valid_shards_already_present_are_skipped(server, base, good, capsys):
    serve_all(server, good)
    folder = folder_of(base)
    folder.mkdir(parents=True)
    (folder / "shard_00000.parquet").write_bytes(good[0])
    (folder / shards.shard_name(VAL)).write_bytes(good[VAL])
    assert download_cli.main(download_args(server)) == 0
    assert [p for p, _ in server.requests] == ["/climbmix/shard_00001.parquet"]
    captured = capsys.readouterr()
    assert "1 shard(s) fetched, 2 skipped" in captured.out
    assert "2 shard(s) already present and valid" in captured.err


def test_corrupt_shard_on_disk_is_fetched_again(server, base, good, capsys):
    serve_all(server, good)
    folder = folder_of(base)
    folder.mkdir(parents=True)
    (folder / "shard_00000.parquet").write_bytes(good[0][: len(good[0]) // 3])
    assert download_cli.main(download_args(server)) == 0
    assert server.count(0) == 1
    assert (folder / "shard_00000.parquet").read_bytes() == good[0]
    assert "shard_00000.parquet is present but invalid" in capsys.readouterr().err


def test_stalled_download_times_out_and_leaves_no_file(server, base, good, capsys):
    serve_all(server, good)
    server.route(0, ("stall", good[0], len(good[0]) // 2))
    args = download_args(server, "--retries", "1", "--timeout", "0.5")
    assert download_cli.main(args) == 1
    folder = folder_of(base)
    assert not (folder / "shard_00000.parquet").exists()
    assert temp_files(folder) == []
    assert "error: shard 0 " in capsys.readouterr().err


def run_cli(args: list[str], base: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    env.pop("HF_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.download", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_interrupt_mid_stream_leaves_no_partial_file(server, base, good, sig, code):
    serve_all(server, good)
    server.route(0, ("stall", good[0], len(good[0]) // 2))
    proc = run_cli(download_args(server, "--timeout", "1"), base)
    try:
        assert server.stalled.wait(15), "the client never reached the stalled shard"
        folder = folder_of(base)
        deadline = time.monotonic() + 5
        while not temp_files(folder) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert temp_files(folder), "no temp file while the body was streaming"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "interrupted" in err
    assert not (folder / "shard_00000.parquet").exists()
    assert temp_files(folder) == []


def test_second_run_into_a_locked_folder_exits_2(server, base, good):
    serve_all(server, good)
    folder = folder_of(base)
    with shards.folder_lock(folder):
        proc = run_cli(download_args(server), base)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and ".lock" in err
    assert server.requests == []
    # once released, the same command works
    assert download_cli.main(download_args(server)) == 0


def test_leftover_temp_files_are_swept_under_the_lock(base):
    folder = folder_of(base)
    folder.mkdir(parents=True)
    leftover = folder / ".shard_00003.parquet.abc123.tmp"
    leftover.write_bytes(b"partial")
    with shards.folder_lock(folder):
        assert not leftover.exists()


def test_hf_token_goes_to_huggingface_only(server, base, good, monkeypatch, capsys):
    secret = "hf_secret_token_value"
    monkeypatch.setenv("HF_TOKEN", secret)
    hub = download.Downloader(dataset.REMOTE_DATASETS["climbmix"].base_url, base)
    assert hub._session().headers["Authorization"] == f"Bearer {secret}"
    serve_all(server, good)
    assert download_cli.main(download_args(server)) == 0
    assert all("Authorization" not in headers for _, headers in server.requests)
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err


def test_shard_indices_put_validation_last():
    climbmix = dataset.REMOTE_DATASETS["climbmix"]
    fineweb = dataset.REMOTE_DATASETS["fineweb-edu"]
    assert dataset.shard_indices(climbmix, 2) == [0, 1, 6542]
    assert dataset.shard_indices(fineweb, 3) == [0, 1, 2, 1822]
    assert climbmix.base_url == (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    )


# ----------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded_builds(tmp_path_factory):
    """Two independent builds (about 3 s each)."""
    bases = [tmp_path_factory.mktemp(f"embedded{i}") for i in range(2)]
    return [dataset.ensure_embedded(b) for b in bases]


def test_embedded_corpus_shape(embedded_builds):
    folder = embedded_builds[0]
    train, val = shards.split_shards(folder)
    assert len(train) >= 1
    texts = list(shards.iter_texts([*train, val]))
    val_texts = list(shards.iter_texts([val]))
    chars = sum(map(len, texts))
    assert 1_500_000 <= chars <= 6_000_000, chars  # ~2.4M chars on CPython 3.11
    assert 0.02 <= len(val_texts) / len(texts) <= 0.10
    assert len(set(texts)) == len(texts)  # deduplicated
    assert all(len(t) >= embedded_corpus.MIN_DOCSTRING_CHARS for t in texts)
    assert not (folder / shards.BUILDING_MARKER).exists()


def test_embedded_corpus_is_deterministic(embedded_builds):
    first, second = (list(shards.iter_texts(shards.list_shards(f))) for f in embedded_builds)
    assert first == second
    names = [p.name for p in shards.list_shards(embedded_builds[0])]
    assert names == [p.name for p in shards.list_shards(embedded_builds[1])]


def test_ensure_embedded_rebuilds_only_when_incomplete(tmp_path, monkeypatch):
    calls = []

    def fake_build(folder):
        calls.append(folder)
        for i in range(2):
            shards.write_shard(folder / shards.shard_name(i), [f"document {i}"])

    monkeypatch.setattr(dataset, "_build_embedded", fake_build)
    folder = dataset.ensure_embedded(tmp_path)
    assert folder == shards.data_dir(tmp_path, "embedded") and len(calls) == 1
    dataset.ensure_embedded(tmp_path)
    assert len(calls) == 1  # complete: left alone
    (folder / shards.BUILDING_MARKER).touch()  # an interrupted build
    dataset.ensure_embedded(tmp_path)
    assert len(calls) == 2


def test_embedded_cli_reports_and_is_idempotent(embedded_builds, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(embedded_builds[0].parents[1]))
    before = {p: p.stat().st_mtime_ns for p in shards.list_shards(embedded_builds[0])}
    assert download_cli.main(["--dataset", "embedded"]) == 0
    assert f"embedded: {len(before)} shards" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in shards.list_shards(embedded_builds[0])}


def test_stdlib_walk_skips_tests_and_site_packages():
    files = embedded_corpus.source_files(embedded_corpus.stdlib_root())
    rels = [f.relative_to(embedded_corpus.stdlib_root()).as_posix() for f in files]
    assert rels == sorted(rels) and len(rels) > 300
    assert not any(
        part in embedded_corpus.SKIP_DIRS for rel in rels for part in rel.split("/")[:-1]
    )
    assert "json/decoder.py" in rels


def test_module_pieces_collects_prose_in_source_order():
    long = "This sentence is ordinary English prose about nothing in particular. " * 4
    source = f'''
"""{long}module"""
# {long[:80]}
# {long[80:]}comment
x = """
# {long}not a comment, inside a string
"""
def f():
    """Too short."""
class C:
    """{long}class"""
'''.encode()
    pieces = embedded_corpus.module_pieces(source)
    assert [p.rsplit(" ", 1)[-1] for p in pieces] == ["module", "comment", "string", "class"]
    assert "Too short." not in " ".join(pieces)
    with pytest.raises(SyntaxError):
        embedded_corpus.module_pieces(b"print 'python 2'\n")


# ----------------------------------------------------------------------------- custom folder


def make_source(root: Path) -> list[str]:
    """txt, jsonl and parquet inputs in nested folders; returns the expected documents
    (sorted path order: a/one.txt, b/docs.jsonl, c/d/more.parquet)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "c" / "d").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("first text document")
    (root / "a" / "empty.txt").write_text("  \n")  # skipped
    records = [{"text": f"jsonl document {i}"} for i in range(3)] + [{"text": ""}]
    (root / "b" / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    pq.write_table(
        pa.table({"text": [f"parquet document {i}" for i in range(16)], "id": list(range(16))}),
        root / "c" / "d" / "more.parquet",
    )
    (root / "notes.md").write_text("not a source suffix")
    (root / ".hidden.txt").write_text("hidden")
    return (
        ["first text document"]
        + [f"jsonl document {i}" for i in range(3)]
        + [f"parquet document {i}" for i in range(16)]
    )


def test_custom_folder_fits_one_shard_last_tenth_is_validation(base, tmp_path, capsys):
    expected = make_source(tmp_path / "src")
    assert download_cli.main(["--dataset", "mydocs", "--source", str(tmp_path / "src")]) == 0
    folder = shards.data_dir(base, "mydocs")
    train, val = shards.split_shards(folder)
    assert len(train) == 1
    assert list(shards.iter_texts(train)) == expected[:-2]
    assert list(shards.iter_texts([val])) == expected[-2:]  # round(20 * 0.1) = 2
    assert "20 documents" in capsys.readouterr().out
    # unchanged source: nothing rewritten
    mtimes = [p.stat().st_mtime_ns for p in shards.list_shards(folder)]
    assert download_cli.main(["--dataset", "mydocs", "--source", str(tmp_path / "src")]) == 0
    assert "already converted" in capsys.readouterr().out
    assert mtimes == [p.stat().st_mtime_ns for p in shards.list_shards(folder)]
    # a changed source is converted again
    (tmp_path / "src" / "a" / "two.txt").write_text("second text document")
    assert download_cli.main(["--dataset", "mydocs", "--source", str(tmp_path / "src")]) == 0
    assert "second text document" in list(shards.iter_texts(shards.list_shards(folder)))


def test_custom_folder_many_shards(base, tmp_path):
    expected = make_source(tmp_path / "src")
    args = ["--dataset", "mydocs", "--source", str(tmp_path / "src"), "--shard-chars", "60"]
    assert download_cli.main(args) == 0
    found = shards.list_shards(shards.data_dir(base, "mydocs"))
    assert len(found) > 3
    assert list(shards.iter_texts(found)) == expected  # nothing lost, order kept
    assert all(shards.verify_shard(p) is None for p in found)
    # re-sharding smaller output leaves no stale higher-numbered shard behind
    args[-1] = "1000"
    assert download_cli.main(args) == 0
    assert len(shards.list_shards(shards.data_dir(base, "mydocs"))) == 2


def test_custom_folder_bad_input_is_one_clear_line(base, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert download_cli.main(["--dataset", "mydocs", "--source", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.jsonl:2" in err[0] and "'text'" in err[0]

    (src / "x.jsonl").write_text("\n")
    (src / "empty.txt").write_text("")
    assert download_cli.main(["--dataset", "mydocs", "--source", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 usable document(s)" in err[0]


# ----------------------------------------------------------------------------- usage errors


def test_parser_defaults_and_preset_args():
    args = download_cli.build_parser().parse_args([])
    assert (args.dataset, args.shards, args.source, args.workers) == ("climbmix", 8, None, 8)
    assert (args.retries, args.retry_delay, args.timeout) == (5, 2.0, 60.0)
    args = download_cli.build_parser().parse_args(["--", "--dataset=embedded", "--shards=150"])
    assert (args.dataset, args.shards) == ("embedded", 150)


@pytest.mark.parametrize(
    "argv",
    [
        ["--dataset", "nope"],
        ["--dataset", "Bad Name"],
        ["--shards", "0"],
        ["--shards", "6543"],  # climbmix has 6542 training shards
        ["--dataset", "fineweb-edu", "--shards", "1823"],
        ["--workers", "-1"],
        ["--retries", "0"],
        ["--timeout", "0"],
        ["--retry-delay", "nan"],
        ["--dataset", "embedded", "--source", "http://127.0.0.1:9/"],
        ["--source", "ftp://example.org/data"],
        ["--dataset", "nope", "--source", "http://127.0.0.1:9/"],
        ["--dataset", "mydocs", "--source", "/definitely/not/here"],
        ["--dataset", "climbmix", "--source", "."],  # a remote name for a folder
    ],
)
def test_bad_input_exits_2_with_one_line(argv, base, capsys):
    with pytest.raises(SystemExit) as exc:
        download_cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not base.exists()  # nothing touched on disk


def test_source_overlapping_the_output_folder_is_refused(base, capsys):
    out = shards.data_dir(base, "mydocs")
    out.mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        download_cli.main(["--dataset", "mydocs", "--source", str(out)])
    assert exc.value.code == 2 and "overlaps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--dataset", "nope"], "unknown --dataset 'nope'"),
        (["--dataset", "embedded", "--source", "/tmp"], "takes no --source"),
        (["--dataset", "mydocs", "--source", "/definitely/not/here"], "does not exist"),
    ],
)
def test_cli_bad_input_subprocess(argv, words, tmp_path):
    proc = run_cli(argv, tmp_path / "base")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and words in err
    assert out == ""
    assert not (tmp_path / "base").exists()
