"""chat-web servers for the tests: a checkpoint whose greedy reply is scripted, real servers
(``python -m scripts.chat_web``) on 127.0.0.1 in subprocesses, and plain HTTP requests.

The checkpoint is a depth-2 GPT whose blocks start as the identity (zero output projections),
so the logits depend on the current token only, and whose head makes each token of a chain
predict the next. From ``<|assistant_start|>`` it writes "Hi 你é🙂" one byte per token
(characters of 3, 2 and 4 bytes: every one split across tokens), calls the calculator with
``2+3``, gets ``5`` forced in by the engine, writes "!" and ends its turn, whatever the
prompt; with ``loop`` it starts over instead of ending (slow requests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

from helpers.waiting import wait_for

REPLY_TEXT = "Hi 你é🙂"
EXPRESSION, RESULT = "2+3", "5"
# The reply as plain clients see it: tool call and output inline.
EXPECTED = f"{REPLY_TEXT}\n```python\n{EXPRESSION}\n```\n= {RESULT}\n!"
# Tokens: 12 bytes, python_start + 3 + python_end, output_start + 1 + output_end, "!".
EXPECTED_TOKENS = len(REPLY_TEXT.encode()) + 5 + 3 + 1
API_KEY = "test-key-123"
USER = [{"role": "user", "content": "What is 2+3?"}]
JSON = {"Content-Type": "application/json"}  # the API refuses other bodies (415)


def build_chat_checkpoint(
    base: Path, tag: str = "d2", sequence_len: int = 128, loop=False, tool=True
):
    """Tokenizer + a base checkpoint under ``base`` whose greedy reply is EXPECTED (or, with
    ``loop``, that reply repeated without end; without ``tool``, REPLY_TEXT alone, no
    calculator call). Returns the tokenizer."""
    import torch

    from helpers.builders import save_checkpoint, tiny_gpt, tokenizer_for
    from nanochat.model.gpt import config_for_depth
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    if (tokenizer_dir(base) / "tokenizer.json").is_file():
        tok = Tokenizer.load(tokenizer_dir(base))
    else:
        tok = tokenizer_for(["hello world, héllo wörld, 你好 世界 🙂 2+3=5"] * 50, 300, base)
    config = config_for_depth(2, tok.vocab_size, sequence_len=sequence_len)
    model = tiny_gpt(config)
    byte_id = {tok.id_to_bytes(i): i for i in range(tok.vocab_size) if not tok.is_special(i)}
    sid = tok.special_id
    chain = [sid("<|assistant_start|>")] + [byte_id[bytes([b])] for b in REPLY_TEXT.encode()]
    if tool:
        chain += [sid("<|python_start|>"), *(byte_id[c.encode()] for c in EXPRESSION)]
        chain.append(sid("<|python_end|>"))  # the engine forces output_start 5 output_end next
        tail = [sid("<|output_end|>"), byte_id[b"!"]]
    else:
        tail = [chain[-1]]
    tail.append(chain[1] if loop else sid("<|assistant_end|>"))
    pairs = [*zip(chain, chain[1:], strict=False), *zip(tail, tail[1:], strict=False)]
    assert len({a for a, _ in pairs}) == len(pairs), "a token may have only one successor"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.wte.weight.copy_(torch.randn(model.wte.weight.shape, generator=generator))
        # Each block adds zero (output projections start at zero): the last hidden state is
        # norm(embedding of the current token), so a head row aligned with it picks the next.
        hidden = torch.nn.functional.rms_norm(model.wte.weight, (config.n_embd,))
        head = torch.zeros_like(model.lm_head.weight)
        for current, following in pairs:
            head[following] += 20.0 * hidden[current] / config.n_embd  # logit ~20 -> ~13
        model.lm_head.weight.copy_(head)
    save_checkpoint(base, model, tag=tag)
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m scripts.chat_web`` in a subprocess, its output in a log file."""

    def __init__(self, base: Path, *args: str, env: dict | None = None, name="server"):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base.parent / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "w")  # closed in stop()
        argv = [sys.executable, "-m", "scripts.chat_web", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={
                **os.environ,
                "NANOCHAT_BASE_DIR": str(base),
                "OMP_NUM_THREADS": "1",  # several servers share 2 cores
                **(env or {}),
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def healthy(self) -> bool:
        """Whether /health answers 200; fails the test if the server has exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"server exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 90) -> Server:
        what = f"the {self.name} server to answer /health"
        wait_for(self.healthy, what, timeout, explain=lambda: self.log()[-3000:])
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def serving(started: dict[str, Server]):
    """Wait for every server of ``started`` to answer, hand them over, stop them all after:
    the body of a module's ``servers`` fixture (conftest's ``server`` and ``client`` build on
    it)."""
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def request(url: str, body=None, headers: dict | None = None, method=None):
    """(status, headers (any case), parsed JSON or text) of one HTTP request, errors too."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, err.headers, err.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw.decode()
