"""Score a model's HumanEval answer with the tests outside the answer's process.

``execute_code`` runs a program in the sandbox and can prove that it ran to its end, but a
program that wants to cheat can fake that proof from inside its own interpreter (re-enter
the runner, read the proof pipe, return an object equal to anything). So the tests do not
run there. Two processes instead (``check_answer``):

- the **answer**, in the sandbox (``nanochat.inference.execution``): the model's code, then a loop
  that serves calls of the entry point: it reads the arguments, calls the function, sends
  back the result;
- the **checker**, a plain interpreter with a clean environment and limits: it runs the
  problem's prompt (its helper functions) and tests, trusted code from the dataset, with
  ``candidate`` standing for a function that forwards each call to the answer.

Only data crosses between them, in both directions: JSON of plain values (None, bool, int,
float, str, bytes, complex, list, tuple, set, frozenset, dict; numpy scalars and arrays as
their Python values), decoded without running any code. The checker's exit is the verdict:
the answer can return wrong values or stop answering, never make the tests pass. An answer
that returns something else (a generator, an object of its own class) fails with a line
saying so. An exception the answer raises reaches the tests as the built-in exception of
that name (others, and StopIteration, as ``AnswerError``), so tests that expect one still
work. Subclasses of the built-in containers (Counter, namedtuple) arrive as their base.

The tests stay out of the answer's reach only as far as the sandbox keeps it from reading
them: they reach the checker in a file of a 0700 folder, never on a command line. Under
bubblewrap the answer sees none of the caller's files. Under the guard alone it can read
what its uid may read: as uid 65534 (a root caller) world-readable files only; as the
caller's own uid (the guard without the switch), the dataset's files too, so a deliberate
cheat could look the expected values up. chat-eval's ``sandbox:`` line says which applies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanochat.common import one_line
from nanochat.inference.execution import (
    ERROR_CHARS,
    KEEP_OUTPUT_CHARS,
    ExecutionResult,
    active_layer,
    execute_code,
)

MAX_MESSAGE_BYTES = 16 << 20  # one call's arguments or result
CHECKER_MEMORY_MB = 1024
CHECKER_GRACE_S = 5.0  # the checker's wait beyond the answer's time limit

# Shared by both programs (standard library only): length-prefixed JSON messages on file
# descriptors, and plain values to and from JSON.
CODEC = r"""
import json as _nc_json, os as _nc_os

_nc_MAX = @MAX_MESSAGE_BYTES@
_nc_write, _nc_read = _nc_os.write, _nc_os.read

def _nc_encode(v, depth=0):
    if depth > 100:
        raise TypeError("nested more than 100 deep")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, (int, float, str)):  # a subclass (an enum, an int whose == lies): its value
        return next(t for t in (int, float, str) if isinstance(v, t))(v)
    if isinstance(v, (list, tuple, set, frozenset)):  # subclasses too (a namedtuple): as the base
        tag = next(t.__name__ for t in (list, tuple, frozenset, set) if isinstance(v, t))
        return {"t": tag, "v": [_nc_encode(x, depth + 1) for x in v]}
    if isinstance(v, dict):  # Counter, defaultdict, OrderedDict: as a dict
        pairs = [[_nc_encode(k, depth + 1), _nc_encode(x, depth + 1)] for k, x in v.items()]
        return {"t": "dict", "v": pairs}
    if isinstance(v, bytes):
        return {"t": "bytes", "v": v.hex()}
    if isinstance(v, complex):
        return {"t": "complex", "v": [v.real, v.imag]}
    if type(v).__module__ == "numpy" and hasattr(v, "tolist"):
        return _nc_encode(v.tolist(), depth)  # numpy scalars and arrays: Python values
    raise TypeError(f"a {type(v).__module__}.{type(v).__qualname__}")

def _nc_decode(o):
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    if isinstance(o, list):
        raise ValueError("an untagged list")
    tag, v = o["t"], o["v"]
    if tag == "bytes":
        return bytes.fromhex(v)
    if tag == "complex":
        return complex(float(v[0]), float(v[1]))
    if tag == "dict":
        return {_nc_decode(k): _nc_decode(x) for k, x in v}
    items = [_nc_decode(x) for x in v]
    return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)

def _nc_send(fd, message):
    data = _nc_json.dumps(message).encode()
    if len(data) > _nc_MAX:
        raise ValueError(f"a message of {len(data)} bytes (at most {_nc_MAX})")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[_nc_write(fd, data):]

def _nc_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = _nc_read(fd, min(n - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return data

def _nc_receive(fd):
    head = _nc_exactly(fd, 8)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > _nc_MAX:
        raise ValueError(f"a message of {n} bytes (at most {_nc_MAX})")
    data = _nc_exactly(fd, n)
    if data is None:
        return None
    return _nc_json.loads(data)
""".replace("@MAX_MESSAGE_BYTES@", str(MAX_MESSAGE_BYTES))

# The program in the sandbox: the codec, then the answer run in a namespace of its own (its
# helpers and names cannot clash with the codec's), then serving calls of the entry point
# until the checker closes its end.
SERVE = r"""

def _nc_serve_calls(function, requests, replies):
    while True:
        message = _nc_receive(requests)
        if message is None:
            return
        try:
            value = function(*_nc_decode(message["args"]), **_nc_decode(message["kwargs"]))
        except Exception as exc:
            _nc_send(replies, {"raised": type(exc).__name__, "message": str(exc)[:2000]})
            continue
        try:
            reply = {"value": _nc_encode(value)}
        except (TypeError, ValueError, RecursionError) as exc:
            reply = {"unsendable": f"returned {exc}, which the tests cannot receive"}
        _nc_send(replies, reply)

_nc_answer = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(@ANSWER@, "answer.py", "exec"), _nc_answer)
_nc_serve_calls(_nc_answer[@ENTRY@], @REQUESTS@, @REPLIES@)
"""

# The checker: the problem's prompt and tests, ``candidate`` calling the answer.
CHECKER = r"""
import builtins, resource, sys
with open(sys.argv[1], encoding="utf-8") as _f:  # in a folder only this user can read
    cfg = _nc_json.load(_f)
for _which, _value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                       (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_which, (_value, _value))

class AnswerError(Exception):
    "An exception of the answer's own class, or a result the tests cannot receive."

def candidate(*args, **kwargs):
    _nc_send(cfg["requests"], {"args": _nc_encode(args), "kwargs": _nc_encode(kwargs)})
    reply = _nc_receive(cfg["replies"])
    if reply is None:
        raise AnswerError("the answer stopped answering (it crashed, exited or timed out)")
    if "value" in reply:
        return _nc_decode(reply["value"])
    if "unsendable" in reply:
        raise AnswerError(reply["unsendable"])
    kind = getattr(builtins, str(reply["raised"]), None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)) or issubclass(
        kind, (StopIteration, StopAsyncIteration)  # would end the tests' own loops quietly
    ):
        kind = AnswerError
    raise kind(reply["message"])

namespace = {"__name__": "__main__"}
exec(compile(cfg["prompt"], "prompt.py", "exec"), namespace)
namespace[cfg["entry_point"]] = candidate  # some tests call the function by its name
exec(compile(cfg["test"], "test.py", "exec"), namespace)
namespace["check"](candidate)
print("passed")
"""


def check_answer(
    answer: str, entry_point: str, prompt: str, test: str, timeout_s: float = 5.0
) -> ExecutionResult:
    """Run ``answer`` (code defining ``entry_point``) in the sandbox and ``test`` (defining
    ``check(candidate)``) in the checker; ``success`` only when ``check`` returned.
    ``stdout``/``stderr`` are the answer's; ``error`` says why it failed, in one line."""
    if not entry_point.isidentifier():
        raise ValueError(f"not a function name: {entry_point!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    active_layer()  # a sandbox that cannot run fails here, before any process or pipe
    with tempfile.TemporaryDirectory(prefix="nanochat-check-") as tmp:  # 0700: ours only
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        serve = SERVE.replace("@ENTRY@", repr(entry_point)).replace("@ANSWER@", repr(answer))
        serve = serve.replace("@REQUESTS@", str(requests_r)).replace("@REPLIES@", str(replies_w))
        config = {
            "requests": requests_w,
            "replies": replies_r,
            "entry_point": entry_point,
            "prompt": prompt,
            "test": test,
            "memory": CHECKER_MEMORY_MB << 20,
            "cpu": int(timeout_s) + 2,
        }
        # Not on the command line: /proc/<pid>/cmdline is readable by every process, the
        # answer's included where it shares the pid namespace (the guard layer).
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        checker = None
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                checker = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", CODEC + CHECKER, str(config_path)],
                    cwd=tmp,
                    env={**env, "HOME": tmp, "TMPDIR": tmp},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(requests_w, replies_r),
                    start_new_session=True,
                )
        except BaseException:
            os.close(requests_r)
            os.close(replies_w)
            raise
        finally:
            os.close(requests_w)  # the checker's ends: only the checker holds them now
            os.close(replies_r)
        start = time.monotonic()
        try:  # execute_code closes the answer's ends, whatever happens
            ran = execute_code(CODEC + serve, timeout_s, pass_fds=(requests_r, replies_w))
            left = timeout_s + CHECKER_GRACE_S - (time.monotonic() - start)
            checker.wait(timeout=max(0.1, left))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if checker.poll() is None:
                checker.kill()
                checker.wait()
        passed = checker.returncode == 0 and out_path.read_bytes().endswith(b"passed\n")
        said = err_path.read_text(errors="replace")[-KEEP_OUTPUT_CHARS:]
    if passed:
        return ExecutionResult(True, ran.stdout, ran.stderr, None, False, False)
    error = ran.error  # the answer's own failure (a crash, a timeout) says the most
    if error is None:
        last = said.strip().splitlines()[-1:] or [f"the checker exited {checker.returncode}"]
        error = one_line(last[0], ERROR_CHARS)
    return ExecutionResult(False, ran.stdout, ran.stderr, error, ran.timeout, ran.memory_exceeded)
