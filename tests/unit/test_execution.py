"""The code sandbox (nanochat/inference/execution.py): limits hold, destructive calls are refused,
output comes back, and a normal program succeeds. Each case starts one small Python process."""

from __future__ import annotations

import os
import time

from nanochat.inference.execution import execute_code


def test_a_normal_program_succeeds_with_its_output():
    result = execute_code(
        "import sys\n"
        "def add(a, b):\n"
        "    return a + b\n"
        "assert add(2, 3) == 5\n"
        "print('out', add(1, 1))\n"
        "print('warn', file=sys.stderr)\n"
    )
    assert result.success, result
    assert result.error is None and not result.timeout and not result.memory_exceeded
    assert result.stdout == "out 2\n"
    assert result.stderr == "warn\n"


def test_an_exception_is_reported_in_one_line_with_its_traceback():
    result = execute_code("print('before')\nassert 1 + 1 == 3, 'math'\n")
    assert not result.success
    assert result.error == "AssertionError: math"
    assert result.stdout == "before\n"
    assert 'File "program.py", line 2' in result.stderr


def test_exiting_is_never_a_pass():
    # Only the runner reaching the program's end proves a pass, not the exit status: a
    # HumanEval answer that exits before its tests run must fail (tests/e2e/test_faults_forged.py).
    for program in ("import sys; sys.exit(0)", "raise SystemExit", "import os; os._exit(0)"):
        result = execute_code(program)
        assert not result.success and result.error, (program, result)
    failed = execute_code("import sys; sys.exit(3)")
    assert not failed.success
    assert failed.error == "SystemExit: 3 (the program exited before its end)"


def test_an_endless_loop_times_out_near_the_limit():
    start = time.monotonic()
    result = execute_code("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.timeout and not result.success
    assert result.error == "timed out after 1 s"
    assert elapsed < 1.0 + 2.0


def test_a_memory_bomb_hits_the_limit_and_the_parent_is_unharmed():
    result = execute_code("x = bytearray(2**32)\nprint('survived')\n", memory_mb=256)
    assert not result.success
    assert result.memory_exceeded
    assert "survived" not in result.stdout
    assert bytearray(1 << 20)  # the parent still allocates


def test_writes_and_removals_outside_the_sandbox_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    outside = tmp_path / "new.txt"
    programs = [
        f"open({str(outside)!r}, 'w').write('x')",
        f"import pathlib; pathlib.Path({str(outside)!r}).write_text('x')",
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import os; os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
    ]
    for program in programs:
        result = execute_code(program)
        assert not result.success, program
        assert result.error.startswith("PermissionError: sandbox:"), (program, result.error)
    assert victim.read_text() == "precious"
    assert not outside.exists()


def test_files_inside_the_sandbox_work():
    result = execute_code(
        "import os, shutil, tempfile\n"
        "os.makedirs('a/b')\n"
        "with open('a/b/f.txt', 'w') as f:\n"
        "    f.write('hi')\n"
        "print(open('a/b/f.txt').read())\n"
        "shutil.rmtree('a')\n"
        "with tempfile.TemporaryFile() as t:\n"
        "    t.write(b'x')\n"
        "print(os.listdir('.'))\n"
    )
    assert result.success, result.stderr
    assert result.stdout == "hi\n[]\n"


def test_processes_and_network_are_refused():
    for program in (
        "import subprocess; subprocess.run(['echo', 'spawned'])",
        "import os; os.system('echo spawned')",
        "import os; os.kill(os.getpid(), 0)",  # signal 0: harmless if the guard failed
        "import multiprocessing as m; m.Process(target=print, args=('spawned',)).start()",
        "import socket; socket.create_connection(('127.0.0.1', 80))",
    ):
        result = execute_code(program)
        assert not result.success, program
        assert result.error.startswith("PermissionError: sandbox:"), (program, result.error)
        assert "spawned" not in result.stdout


def test_the_environment_is_scrubbed_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-value")
    result = execute_code(
        "import os, sys\n"
        "print(sorted(os.environ))\n"
        "print(repr(sys.stdin.read()))\n"
        "print(os.getcwd() == os.environ['HOME'])\n"
    )
    assert result.success, result.stderr
    names, stdin, cwd_is_home = result.stdout.splitlines()
    assert "HF_TOKEN" not in names and "secret-value" not in result.stdout
    assert stdin == "''"
    assert cwd_is_home == "True"
    assert os.environ["HF_TOKEN"] == "secret-value"  # the parent's own env is untouched
