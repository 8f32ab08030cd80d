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

Answer = tuple  # (HTTP status, body) or (HTTP status, body, {header: value})


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
                    answer = hub.get(self.path)
                self._answer(answer, "application/octet-stream")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hub._lock:
                    hub.requests.append(("POST", self.path, body))
                    answer = hub.post(self.path, body)
                self._answer(answer, "application/json")

            def do_PUT(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hub._lock:
                    hub.requests.append(("PUT", self.path, body))
                    answer = hub.put(self.path, body)
                self._answer(answer, "application/json")

            def _answer(self, answer: Answer | None, kind: str):
                if answer is None:
                    self.send_error(404)
                    return
                status, body, *more = answer
                self.send_response(status)
                for name, value in (more[0] if more else {}).items():
                    self.send_header(name, value)
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

    def get(self, path: str) -> Answer | None:
        """A GET's answer: the next scripted one for ``key(path)``."""
        script = self.answers.get(self.key(path))
        return (script.pop(0) if len(script) > 1 else script[0]) if script else None

    def post(self, path: str, body: bytes) -> Answer | None:
        return None

    def put(self, path: str, body: bytes) -> Answer | None:
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
    """The Hub's model API as ``huggingface_hub`` speaks it for an upload, over repositories
    kept in ``repos`` (id -> {"private", "files": path -> bytes}):
    GET /api/models/<repo> (its info, 404 when missing), POST /api/repos/create, PUT
    /api/models/<repo>/settings (visibility), POST /api/validate-yaml (the card's header must
    be a YAML mapping), GET /api/models/<repo>/tree/main (the file listing), POST
    .../preupload/main (every file "regular": carried inside the commit, so no LFS or Xet
    storage is involved) and POST .../commit/main (NDJSON: files added base64, files
    deleted). ``created`` and ``commits`` record what arrived; ``refuse`` makes every
    request fail with that HTTP status (a bad token)."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.refuse: int | None = None
        super().__init__()

    def files(self, repo: str) -> dict[str, bytes]:
        return self.repos[repo]["files"] if repo in self.repos else {}

    @staticmethod
    def _repo(path: str) -> str:
        rest = path.split("?", 1)[0].split("/api/models/", 1)[1]
        return "/".join(rest.split("/")[:2])

    def _json(self, value, status: int = 200) -> Answer:
        return status, json.dumps(value).encode()

    def get(self, path: str) -> Answer | None:
        if self.refuse:
            return self._json({"error": "refused"}, self.refuse)
        if not path.startswith("/api/models/"):
            return None
        repo = self._repo(path)
        if repo not in self.repos:  # the header is how huggingface_hub tells "no such repo"
            return *self._json({"error": "Repository not found"}, 404), {
                "X-Error-Code": "RepoNotFound"
            }
        files = self.repos[repo]["files"]
        if "/tree/" in path:
            listing = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for name, data in sorted(files.items())
            ]
            return self._json(listing)
        info = {"id": repo, "private": self.repos[repo]["private"], "sha": "0" * 40}
        return self._json({**info, "siblings": [{"rfilename": name} for name in files]})

    def put(self, path: str, body: bytes) -> Answer | None:
        if self.refuse:
            return self._json({"error": "refused"}, self.refuse)
        if path.endswith("/settings") and self._repo(path) in self.repos:
            settings = json.loads(body)
            private = settings.get("visibility", "private") == "private"
            self.repos[self._repo(path)]["private"] = settings.get("private", private)
            return self._json({})
        return None

    def post(self, path: str, body: bytes) -> Answer | None:
        import base64

        import yaml

        if self.refuse:
            return self._json({"error": "refused"}, self.refuse)
        if path.startswith("/api/repos/create"):
            request = json.loads(body)
            self.created.append(request)
            repo = f"{request.get('organization') or 'user'}/{request['name']}"
            self.repos.setdefault(
                repo, {"private": request["visibility"] == "private", "files": {}}
            )
            return self._json({"url": f"{self.url}/{repo}", "name": repo})
        if path.startswith("/api/validate-yaml"):
            content = json.loads(body)["content"]
            header = content.split("---")[1] if content.startswith("---") else ""
            if not isinstance(yaml.safe_load(header) if header else None, dict):
                return self._json({"errors": [{"message": "no YAML mapping"}]}, 400)
            return self._json({"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return self._json({"files": modes})
        if "/commit/" in path:
            repo = self._repo(path)
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            added = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            deleted = [line["value"]["path"] for line in lines if line["key"] == "deletedFile"]
            files = self.repos[repo]["files"]
            for name in deleted:
                files.pop(name, None)
            files.update(added)
            self.commits.append({"repo": repo, "added": sorted(added), "deleted": sorted(deleted)})
            oid = hashlib.sha1(body).hexdigest()
            return self._json({"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid})
        return None
