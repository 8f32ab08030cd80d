"""Fault probes against the HumanEval checker (nanochat/inference/answer_check.py in the
code sandbox, nanochat/inference/execution.py): wrong answers that try to forge a pass
(exiting before the tests, re-entering the runner, writing the report themselves, objects
equal to anything), right answers that must pass however they are written, and what a red
team of the checker found. Each runs under every layer this machine has
(NANOCHAT_SANDBOX=bwrap, =guard; bwrap is skipped, with the reason, only where bubblewrap
cannot run). Programs that try to get out of the sandbox are in test_faults_sandbox.py.

A forged pass is an escape: a probe the layer documents it cannot stop
(helpers.sandbox.admitted) may succeed under it, no other."""

from __future__ import annotations

import os

import pytest
from helpers.sandbox import verdict

from nanochat.tasks.humaneval import HumanEval

WRONG_ADD = "def add(a, b):\n    return a - b\n"

FORGE_THROUGH_GC = """
import gc, io, json, os, sys
ok = json.dumps({"error": None, "type": None})
for obj in gc.get_objects():  # a result file of the runner's, or anything open for writing
    if isinstance(obj, io.IOBase) and not obj.closed and obj.writable():
        try:
            obj.write(ok)
            obj.flush()
        except Exception:
            pass
frame = sys._getframe()
while frame is not None:  # a status variable of the runner's, if one is in reach
    for name in ("status", "finished", "proof"):
        if name in frame.f_locals:
            frame.f_locals[name] = {"error": None, "type": None} if name == "status" else True
    frame = frame.f_back
os._exit(0)
"""

FORGE_THROUGH_DESCRIPTORS = """
import json, os
ok = json.dumps({"error": None, "type": None})
guess = json.dumps({"status": {"error": None, "type": None}, "proof": "0" * 32})
for fd in range(3, 256):  # any inherited descriptor, in the shape of a report
    try:
        os.write(fd, ("ready\\n" + guess + "\\n").encode())
    except OSError:
        pass
os._exit(0)
"""

# What a reward-hacking answer can do inside its own interpreter (the runner is the
# __main__ module): re-enter the runner, find it through gc, or read the real nonce and write
# the proof itself. Each made a wrong answer pass while the tests ran in that interpreter.
FORGE_BY_REENTERING_THE_RUNNER = "import __main__\n__main__._run('')\n"
FORGE_THROUGH_GC_FUNCTIONS = """
import gc
for obj in gc.get_objects():
    code = getattr(obj, "__code__", None)
    if getattr(obj, "__name__", "") == "_run" and "NONCE_FD" in getattr(code, "co_names", ()):
        obj("pass")
"""
FORGE_WITH_THE_REAL_NONCE = """
import __main__, json, os
nonce = os.read(__main__.NONCE_FD, 64).decode()
report = {"status": {"error": None, "type": None}, "proof": nonce}
os.write(__main__.PROOF_FD, (json.dumps(report) + "\\n").encode())
os._exit(0)
"""

EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit()": "exit()\n",
    "raise SystemExit": "raise SystemExit\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SIGKILL": "import posix\nposix.kill(posix.getpid(), 9)\n",
    "gc and os._exit(0)": FORGE_THROUGH_GC,
    "descriptors and os._exit(0)": FORGE_THROUGH_DESCRIPTORS,
    "re-entering the runner": FORGE_BY_REENTERING_THE_RUNNER,
    "gc hunting the runner": FORGE_THROUGH_GC_FUNCTIONS,
    "the real nonce": FORGE_WITH_THE_REAL_NONCE,
}


@pytest.fixture
def add_problem() -> dict:
    task = HumanEval()
    return next(task[i] for i in range(len(task)) if task[i]["entry_point"] == "add")


def test_a_right_answer_passes_and_a_wrong_one_fails(layer, add_problem):
    task = HumanEval()
    assert task.evaluate(add_problem, "```python\ndef add(a, b):\n    return a + b\n```")
    assert not task.evaluate(add_problem, f"```python\n{WRONG_ADD}```")


@pytest.mark.parametrize("exit_how", list(EARLY_EXITS))
def test_a_wrong_answer_that_exits_before_the_tests_fails(layer, add_problem, exit_how):
    completion = f"```python\n{WRONG_ADD}{EARLY_EXITS[exit_how]}```"
    verdict(f"forge {exit_how}", layer, HumanEval().evaluate(add_problem, completion))


def test_an_answer_equal_to_anything_fails(layer, add_problem):
    """Only plain values reach the tests: an object whose __eq__ says yes cannot."""
    cheat = "class Yes:\n    def __eq__(self, other):\n        return True\n"
    completion = f"```python\n{cheat}def add(a, b):\n    return Yes()\n```"
    verdict("forge always-equal", layer, HumanEval().evaluate(add_problem, completion))


RIGHT_ANSWERS = {
    "doctest at the end": 'def add(a, b):\n    """\n    >>> add(1, 2)\n    3\n    """\n'
    '    return a + b\nif __name__ == "__main__":\n    import doctest\n    doctest.testmod()\n',
    "numpy values": "import numpy as np\ndef add(a, b):\n    return np.int64(a) + np.int64(b)\n",
    "printing": "def add(a, b):\n    print('adding', a, b)\n    return a + b\n",
}


@pytest.mark.parametrize("how", list(RIGHT_ANSWERS))
def test_right_answers_pass_however_they_are_written(layer, add_problem, how):
    assert HumanEval().evaluate(add_problem, f"```python\n{RIGHT_ANSWERS[how]}```")


def test_the_tests_receive_values_and_exceptions_as_the_answer_gave_them(layer):
    from nanochat.inference.answer_check import check_answer

    answer = (
        "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n"
        "    return (x, [x], {x: {x}}, b'x', 1.5, None, True, float('inf'))\n"
    )
    test = (
        "def check(candidate):\n"
        "    assert candidate(2) == (2, [2], {2: {2}}, b'x', 1.5, None, True, float('inf'))\n"
        "    assert candidate(1)[6] is True and type(candidate(1)[0]) is int\n"
        "    try:\n        candidate(-1)\n    except ValueError as e:\n"
        "        assert str(e) == 'negative'\n    else:\n        assert False\n"
    )
    result = check_answer(answer, "f", "def f(x):\n    pass\n", test)
    assert result.success, result.error
    generator = "def f(x):\n    yield x\n"
    result = check_answer(generator, "f", "", "def check(candidate):\n    candidate(1)\n")
    assert not result.success and "builtins.generator" in result.error


# --- found by a red team of the checker ---------------------------------------------------

READ_THE_TESTS = """
import os
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read()
    except OSError:
        continue
    if b"def check(candidate)" in line:  # the problem's tests
        print("FOUND THE TESTS", pid)
"""


def test_the_tests_are_not_on_the_checkers_command_line(layer, add_problem):
    """/proc/<pid>/cmdline is readable by anyone: an answer sharing the pid namespace (the
    guard) read the tests there and passed 152 of 164 HumanEval problems without solving."""
    from nanochat.inference.answer_check import check_answer

    answer = READ_THE_TESTS + "def add(a, b):\n    return a + b\n"
    result = check_answer(answer, "add", add_problem["prompt"], add_problem["test"])
    assert result.success, result.error
    assert "FOUND THE TESTS" not in result.stdout


def test_a_crafted_report_fails_the_answer_without_crashing_the_eval(layer, add_problem):
    crash = (
        "import os, sys\nos.write(sys.modules['__main__'].PROOF_FD, "
        "b'\\n' + b'[' * 200000 + b'\\n')\nos._exit(0)\n"
    )
    completion = f"```python\n{WRONG_ADD}{crash}```"
    assert not HumanEval().evaluate(add_problem, completion)  # no RecursionError raised


@pytest.mark.parametrize(
    "answer, test",
    [
        # a test that calls the function by its name, not as candidate (HumanEval/33)
        ("def f(x):\n    return x + 1\n", "def check(candidate):\n    assert f(1) == 2\n"),
        # subclasses of the built-in containers arrive as their base
        (
            "import collections\ndef f(x):\n    return collections.Counter(x)\n",
            "def check(candidate):\n    assert candidate('aab') == {'a': 2, 'b': 1}\n",
        ),
        (
            "import collections\nP = collections.namedtuple('P', 'x y')\n"
            "def f(x):\n    return P(x, x)\n",
            "def check(candidate):\n    assert candidate(3) == (3, 3)\n",
        ),
        # the answer's own helpers may carry any name
        (
            "def _nc_decode(s):\n    return s.swapcase()\ndef f(s):\n    return _nc_decode(s)\n",
            "def check(candidate):\n    assert candidate('aB') == 'Ab'\n",
        ),
    ],
)
def test_right_answers_the_checker_used_to_fail(layer, answer, test):
    from nanochat.inference.answer_check import check_answer

    result = check_answer(answer, "f", "def f(x):\n    pass\n", test)
    assert result.success, result.error


def test_stopiteration_from_the_answer_cannot_end_the_tests_loops(layer):
    from nanochat.inference.answer_check import check_answer

    test = "def check(candidate):\n    assert all(map(candidate, [2, 4]))\n"
    result = check_answer("def f(x):\n    raise StopIteration\n", "f", "", test)
    assert not result.success


def test_no_checker_or_descriptor_is_left_when_the_sandbox_refuses(layer):
    from nanochat.inference.answer_check import check_answer

    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        check_answer("def f(x):\n    return x\n", "f", "", "def check(c):\n    pass\n", 0)
    assert set(os.listdir("/proc/self/fd")) == before
