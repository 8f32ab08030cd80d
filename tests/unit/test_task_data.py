"""Stage task-data (scripts.task_data): listing and fetching the chat datasets' parquet files
from a real local HTTP server that speaks the hub's parquet API, then reading them back with
the task classes. CPU, offline, about a second."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.hub import ParquetHub

from nanochat.common import run_main
from nanochat.data.shards import folder_lock
from nanochat.tasks import GSM8K
from nanochat.tasks.hub import task_data_dir, verify_file
from scripts import task_data


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def gsm_rows(tag: str, n: int = 2) -> list[dict]:
    return [
        {"question": f"{tag} q{i}?", "answer": f"1 + {i} = {1 + i}\n#### {1 + i}"} for i in range(n)
    ]


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    server = ParquetHub()
    yield server
    server.close()


def fetch(hub: ParquetHub, *extra: str) -> int:
    return task_data.main(
        ["--only", "gsm8k", "--endpoint", hub.url, "--retry-delay", "0.01", "--workers", "2",
         "--timeout", "5", *extra]
    )  # fmt: skip


def leftovers(split: str) -> list[str]:
    folder = task_data_dir("gsm8k", split)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_lists_fetches_in_order_and_the_task_reads_it(hub, capsys):
    train = hub.split("train", [parquet_bytes(gsm_rows("a")), parquet_bytes(gsm_rows("b", 3))])
    hub.split("test", [parquet_bytes(gsm_rows("t"))])
    assert fetch(hub) == 0
    folder = task_data_dir("gsm8k", "train")
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["0000.parquet", "0001.parquet"]
    assert "3 file(s) fetched, 0 skipped" in capsys.readouterr().out
    task = GSM8K(source="hub", split="train")
    assert len(task) == 5  # file 0 (2 rows) then file 1 (3 rows), despite the listing order
    assert task[0]["messages"][0]["content"] == "a q0?"
    assert task[4]["messages"][0]["content"] == "b q2?"
    assert len(GSM8K(source="hub", split="test")) == 2

    # A re-run finds every split's listing and valid files: not a single request.
    asked = len(hub.requests)
    assert fetch(hub) == 0
    assert len(hub.requests) == asked
    assert "0 file(s) fetched, 3 skipped" in capsys.readouterr().out

    # A damaged file is listed again and fetched alone.
    (folder / "0001.parquet").write_bytes(b"PAR1 cut")
    assert fetch(hub) == 0
    assert hub.count(train[1]) == 2 and hub.count(train[0]) == 1
    assert "1 file(s) fetched, 2 skipped" in capsys.readouterr().out
    assert len(GSM8K(source="hub", split="train")) == 5


def test_transient_errors_are_retried_and_hf_endpoint_is_the_mirror(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    body = parquet_bytes(gsm_rows("x"))
    (path,) = hub.split("train", [body], listing_errors=1)
    hub.serve(path, (503, b""), (200, body))
    hub.split("test", [body])
    assert task_data.main(["--only", "gsm8k", "--retry-delay", "0.01"]) == 0
    assert hub.count("/api/datasets/openai/gsm8k/parquet/main/train") == 2
    assert hub.count(path) == 2
    assert (task_data_dir("gsm8k", "train") / "0000.parquet").read_bytes() == body


def test_damaged_body_is_retried_then_fails_with_no_file_left(hub, capsys):
    good = parquet_bytes(gsm_rows("g"))
    train = hub.split("train", [good, good])
    hub.serve(train[1], (200, b"<html>rate limited</html>"))
    hub.split("test", [good])
    assert fetch(hub, "--retries", "3") == 1
    assert hub.count(train[1]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 1 download(s) failed")
    assert "gsm8k/train/0001.parquet" in err[-1] and "invalid content" in err[-1]
    folder = task_data_dir("gsm8k", "train")
    assert (folder / "0000.parquet").read_bytes() == good
    assert not (folder / "0001.parquet").exists() and leftovers("train") == []
    # the incomplete split records no listing (so the next run lists it again), the other does
    assert not (folder / task_data.LISTING).exists()
    assert (task_data_dir("gsm8k", "test") / task_data.LISTING).exists()


def test_verify_needs_the_converters_columns(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(parquet_bytes([{"question": "q"}]))
    assert "no column answer" in verify_file(path, ("question", "answer"))
    assert verify_file(path, ("question",)) is None
    path.write_bytes(b"not parquet")
    assert "not a readable parquet" in verify_file(path, ("question",))


def test_embedded_is_a_no_op_and_bad_input_exits_2(base_dir, capsys):
    assert task_data.main(["--tasks=embedded"]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    for argv, needle in [
        (["--only", "gsm8k", "bogus"], "--only 'bogus': unknown task"),
        (["--endpoint", "ftp://mirror"], "expected an http(s) URL"),
        (["--tasks", "local"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as info:
            task_data.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err
    assert not base_dir.exists()  # nothing was written for any of these


def test_a_second_run_into_a_locked_folder_is_one_line_and_exit_2(hub, base_dir, capsys):
    hub.split("train", [parquet_bytes(gsm_rows("a"))])
    hub.split("test", [parquet_bytes(gsm_rows("t"))])
    root = base_dir / "task_data"
    with folder_lock(root, what="task-data"), pytest.raises(SystemExit) as info:
        run_main(lambda: fetch(hub))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: another task-data run is writing")
    assert hub.requests == [] and sorted(p.name for p in root.iterdir()) == [".lock"]
    assert fetch(hub) == 0  # once the first run is done, the same command works
