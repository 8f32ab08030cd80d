"""Stand-ins for the Hugging Face hub on 127.0.0.1: a threaded HTTP server whose answers each
test scripts request by request, in two flavours: the dataset hub (shard files by name and
the paths-info listing, for the download stage) and the hub's parquet API (listings and
files of the chat tasks, for the task-data stage). Every request is recorded."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from urllib.parse import parse_qs

from nanochat.data import shards

Answer = tuple[int, bytes]  # (HTTP status, body)


class ScriptedHub:
    """An HTTP server on 127.0.0.1 (``url``) in a daemon thread. A GET is answered from
    ``answers[key(path)]``, a list of answers used one per request, the last one repeating;
    a key with none gets 404. A POST gets what ``post(path, body)`` returns (404 for None).
    ``requests`` records every request as (method, path, body)."""

    def __init__(self):
        self.answers: dict[str, list[Answer]] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with hub._lock:
                    hub.requests.append(("GET", self.path, b""))
                    script = hub.answers.get(hub.key(self.path))
                    answer = (script.pop(0) if len(script) > 1 else script[0]) if script else None
                self._answer(answer, "application/octet-stream")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hub._lock:
                    hub.requests.append(("POST", self.path, body))
                self._answer(hub.post(self.path, body), "application/json")

            def _answer(self, answer: Answer | None, kind: str):
                if answer is None:
                    self.send_error(404)
                    return
                status, body = answer
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def key(self, path: str) -> str:
        """Which answers a GET of ``path`` takes: the path itself."""
        return path

    def post(self, path: str, body: bytes) -> Answer | None:
        return None

    def gets(self) -> list[str]:
        """The paths of the GET requests so far."""
        return [path for method, path, _ in self.requests if method == "GET"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class DatasetHub(ScriptedHub):
    """The Hugging Face hub (or a plain mirror) of a pretraining dataset. GET .../<file name>
    answers by file name; POST .../paths-info/main answers the ``listing`` entries asked for,
    as the hub does: ``{"type": "file", "path", "size", "oid", "lfs": {"oid", "size"}}``."""

    def __init__(self):
        self.listing: list[dict] = []
        super().__init__()

    def key(self, path: str) -> str:
        return path.rsplit("/", 1)[-1]

    def serve(self, index: int, *bodies: bytes) -> None:
        """Shard ``index`` answers ``bodies``, one per request (none: 404 from now on)."""
        self.answers[shards.shard_name(index)] = [(200, body) for body in bodies]

    def list(self, index: int, body: bytes, size: int | None = None, sha256: str | None = None):
        """A listing entry for shard ``index`` describing ``body`` (or the size/sha256 given)."""
        size = len(body) if size is None else size
        sha256 = hashlib.sha256(body).hexdigest() if sha256 is None else sha256
        self.listing.append(
            {
                "type": "file",
                "path": shards.shard_name(index),
                "size": size,
                "oid": hashlib.sha1(body).hexdigest(),  # a git blob id, not the content hash
                "lfs": {"oid": sha256, "size": size, "pointerSize": 134},
            }
        )

    def post(self, path: str, body: bytes) -> Answer | None:
        if not path.endswith("/paths-info/main"):
            return None
        asked = parse_qs(body.decode()).get("paths", [])
        entries = [e for e in self.listing if e["path"] in asked]
        return 200, json.dumps(entries).encode()

    def count(self, index: int) -> int:
        """How many times shard ``index`` was fetched."""
        name = shards.shard_name(index)
        return sum(1 for path in self.gets() if name in path)


class ParquetHub(ScriptedHub):
    """The hub's parquet API for the chat tasks: ``serve(path, *answers)`` routes a path;
    ``split`` routes a whole gsm8k split (its listing and its files)."""

    def serve(self, path: str, *answers: Answer) -> None:
        self.answers[path] = list(answers)

    def split(self, split: str, bodies: list[bytes], listing_errors: int = 0) -> list[str]:
        """Route the gsm8k (config main) listing of ``split`` and its files; the listing
        names them in reverse order, as 0.parquet, 1.parquet... Returns the file paths."""
        paths = [f"/files/gsm8k/main/{split}/{i}.parquet" for i in range(len(bodies))]
        for path, body in zip(paths, bodies, strict=True):
            self.serve(path, (200, body))
        listing = json.dumps([self.url + p for p in reversed(paths)]).encode()
        answers = [(500, b"busy")] * listing_errors + [(200, listing)]
        self.serve(f"/api/datasets/openai/gsm8k/parquet/main/{split}", *answers)
        return paths

    def count(self, path: str) -> int:
        """How many times ``path`` was asked for."""
        return self.gets().count(path)


class UploadHub(ScriptedHub):
    """The Hub's model-upload API as ``huggingface_hub`` speaks it: POST /api/repos/create
    (the repository's name and visibility), POST /api/models/<repo>/preupload/main (every file
    answered "regular": carried inside the commit, so no LFS or Xet storage is involved), and
    POST /api/models/<repo>/commit/main (the commit as NDJSON, files base64 inside), and the
    model card's check, POST /api/validate-yaml (its header must be a YAML mapping).
    ``created`` and ``commits`` record what arrived; ``files`` is the last commit's content."""

    def __init__(self):
        self.created: list[dict] = []
        self.commits: list[dict] = []
        super().__init__()

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits[-1]["files"] if self.commits else {}

    def post(self, path: str, body: bytes) -> Answer | None:
        import base64

        if path.startswith("/api/repos/create"):
            request = json.loads(body)
            self.created.append(request)
            repo = f"{request.get('organization') or 'user'}/{request['name']}"
            return 200, json.dumps({"url": f"{self.url}/{repo}", "name": repo}).encode()
        if path.startswith("/api/validate-yaml"):  # the model card's YAML header, as a mapping
            import yaml

            content = json.loads(body)["content"]
            header = content.split("---")[1] if content.startswith("---") else ""
            parsed = yaml.safe_load(header) if header else None
            if not isinstance(parsed, dict):
                return 400, json.dumps({"errors": [{"message": "no YAML mapping"}]}).encode()
            return 200, json.dumps({"errors": [], "warnings": []}).encode()
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return 200, json.dumps({"files": modes}).encode()
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            self.commits.append({"path": path, "header": header, "files": files})
            oid = hashlib.sha1(body).hexdigest()
            repo = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            answer = {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}
            return 200, json.dumps(answer).encode()
        return None
