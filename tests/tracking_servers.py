"""Loopback endpoints for the tracking tests, and a reader for what offline wandb writes.

- `FileServer`: serves a folder over HTTP (checkpoint URLs).
- `HubServer`: a small Hugging Face Hub-compatible HTTP API that the real `huggingface_hub.HfApi`
  client talks to: repo creation, preupload, the git LFS batch API with basic PUT transfers, and
  ndjson commits with base64 and LFS files. Committed files are stored under `root/<repo_id>/` and
  served back at `/<repo_id>/resolve/<revision>/<path>` (HEAD and GET, as `hf_hub_download` asks).
  By default every file is a regular (base64) upload; with `lfs=True`, weight files (.pt,
  .safetensors, ...) go through LFS as on the real hub, which needs the client's Xet transfer off
  (`HF_HUB_DISABLE_XET=1`): this server does not speak the Xet protocol.
  `fail_with = 500` makes every call answer that status (an unavailable hub).
- `wandb_records`: the records of an offline run's `.wandb` file (a LevelDB-style log of protobufs).

These are real HTTP servers on 127.0.0.1 (a free port), each in a daemon thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import secrets
import shutil
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple


class _Server:
    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class FileServer(_Server):
    """Serves the files under `root` at `self.url/<relative path>`."""

    def __init__(self, root: Path):
        super().__init__(functools.partial(_QuietFileHandler, directory=str(root)))


class HubServer(_Server):
    """A hub-compatible endpoint storing committed files under `root/<repo_id>/<path>`."""

    LFS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

    def __init__(self, root: Path, token: Optional[str] = None, lfs: bool = False):
        self.root = Path(root)
        self.token = token
        self.lfs = lfs
        self._signature = secrets.token_hex(8)  # LFS upload URLs are presigned, like the hub's storage URLs
        self.fail_with: Optional[int] = None
        self.requests: List[Tuple[str, str]] = []
        self.commits: List[Dict] = []
        self.lfs_uploads: List[str] = []
        self.heads: Dict[str, str] = {}  # repo id -> last commit oid
        self.validated_metadata: List[Dict] = []  # README metadata the client asked to validate
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):
                pass

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

        super().__init__(Handler)

    # --- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _body(request: BaseHTTPRequestHandler) -> bytes:
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(request.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    request.rfile.readline()
                    return data
                data += request.rfile.read(size)
                request.rfile.readline()
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, payload=None, error_code: Optional[str] = None):
        body = json.dumps(payload if payload is not None else {}).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        if error_code:
            request.send_header("X-Error-Code", error_code)
        request.end_headers()
        request.wfile.write(body)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?")[0]
        body = self._body(request)
        with self._lock:
            self.requests.append((method, path))
        if self.fail_with is not None:
            return self._reply(request, self.fail_with, {"error": "the hub is unavailable"})
        presigned = path.startswith("/lfs-upload/") and f"sig={self._signature}" in request.path
        if self.token is not None and not presigned and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(request, 401, {"error": "Invalid credentials"})

        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(request, json.loads(body))
        if (
            method == "POST" and path == "/api/validate-yaml"
        ):  # the client checks a README's metadata before committing it
            return self._validate_yaml(request, json.loads(body)["content"])
        match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>[^/]+)", path)
        if method == "POST" and match:
            if not self.repo_dir(match["repo"]).is_dir():
                return self._reply(request, 404, {"error": "Repository not found"}, error_code="RepoNotFound")
            if match["action"] == "preupload":
                return self._preupload(request, json.loads(body))
            return self._commit(request, match["repo"], body)
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and match:
            return self._lfs_batch(request, json.loads(body))
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if method in ("GET", "HEAD") and match:
            return self._resolve(request, match["repo"], match["file"], send_body=method == "GET")
        match = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)
        if method == "PUT" and match:
            if hashlib.sha256(body).hexdigest() != match["oid"]:
                return self._reply(request, 400, {"error": "sha256 mismatch"})
            blob = self.root / ".lfs" / match["oid"]
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(body)
            with self._lock:
                self.lfs_uploads.append(match["oid"])
            return self._reply(request, 200, {})
        return self._reply(request, 404, {"error": f"no route for {method} {path}"})

    # --- routes -------------------------------------------------------------------------------

    def _create_repo(self, request, payload):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        folder = self.repo_dir(repo_id)
        if folder.is_dir():
            return self._reply(
                request, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            )
        folder.mkdir(parents=True)
        return self._reply(request, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, request, content: str):
        import yaml

        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return self._reply(request, 400, {"error": f"invalid YAML metadata: {error}"})
        if not isinstance(metadata, dict):
            return self._reply(request, 400, {"error": "the metadata must be a YAML mapping"})
        with self._lock:
            self.validated_metadata.append(metadata)
        return self._reply(request, 200, {"errors": [], "warnings": []})

    def _resolve(self, request, repo_id: str, file: str, send_body: bool):
        target = self.repo_dir(repo_id) / file
        if not self.repo_dir(repo_id).is_dir():
            return self._reply(request, 404, {"error": "Repository not found"}, error_code="RepoNotFound")
        if not target.is_file():
            return self._reply(request, 404, {"error": "Entry not found"}, error_code="EntryNotFound")
        data = target.read_bytes()
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.send_header("X-Repo-Commit", self.heads.get(repo_id, "0" * 40))
        request.end_headers()
        if send_body:
            request.wfile.write(data)

    def _preupload(self, request, payload):
        files = [
            {
                "path": item["path"],
                "uploadMode": "lfs" if self.lfs and item["path"].endswith(self.LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for item in payload["files"]
        ]
        return self._reply(request, 200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, request, payload):
        objects = [
            {
                "oid": item["oid"],
                "size": item["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}?sig={self._signature}"}},
            }
            for item in payload["objects"]
        ]
        return self._reply(request, 200, {"transfer": "basic", "objects": objects})

    def _commit(self, request, repo_id: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        folder = self.repo_dir(repo_id)
        written = []
        for line in lines[1:]:
            value = line["value"]
            target = folder / value["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if line["key"] == "file":
                target.write_bytes(base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                blob = self.root / ".lfs" / value["oid"]
                if not blob.is_file():
                    return self._reply(request, 400, {"error": f"LFS object {value['oid']} was not uploaded"})
                shutil.copyfile(blob, target)
            else:
                return self._reply(request, 400, {"error": f"unsupported commit operation {line['key']}"})
            written.append((line["key"], value["path"]))
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.commits.append({"summary": lines[0]["value"]["summary"], "files": written})
            self.heads[repo_id] = oid
        return self._reply(request, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid})


# --- offline wandb runs ----------------------------------------------------------------------------


def _wandb_log_payloads(path: Path) -> Iterator[bytes]:
    """Records of a `.wandb` file: a ':W&B' header, then LevelDB log blocks of 32 KiB."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # block trailer padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        if position + length > len(data):  # a record still being written
            break
        chunk = data[position : position + length]
        position += length
        if kind == 0:
            break
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def wandb_records(run_dir: Path, wait_s: float = 60.0) -> List[Tuple[str, object]]:
    """(record type, record) for every record of the finished offline run in `run_dir`.

    wandb's service process writes the file asynchronously, still after `run.finish()` returns;
    this waits (up to `wait_s`) for the run's closing `exit` record before returning.
    """
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        (run_file,) = Path(run_dir).glob("run-*.wandb")
        records = []
        for payload in _wandb_log_payloads(run_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            records.append((kind, getattr(record, kind)))
        if any(kind == "exit" for kind, _ in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_history(run_dir: Path) -> List[Dict[str, object]]:
    """The logged rows of an offline run: one dict per history record (nested keys joined by '.')."""
    rows = []
    for kind, record in wandb_records(run_dir):
        if kind == "history":
            rows.append({".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.item})
    return rows


def wandb_config(run_dir: Path) -> Dict[str, object]:
    """The config recorded in an offline run (from its run record and config updates)."""
    config: Dict[str, object] = {}
    for kind, record in wandb_records(run_dir):
        updates = record.config.update if kind == "run" else record.update if kind == "config" else []
        for item in updates:
            config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config


def wandb_run_dirs(wandb_dir: Path, run_id: str) -> List[Path]:
    """The offline run folders of `run_id` under `wandb_dir`, oldest first.

    wandb names them `offline-run-<YYYYmmdd_HHMMSS>-<id>`; a second process of the same run started
    within the same second gets `-1` (then `-2`, ...) appended, so both shapes are matched and the
    order is (time, suffix), not the folder name alone.
    """
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for path in Path(wandb_dir).glob("wandb/offline-run-*"):
        match = pattern.fullmatch(path.name)
        if match:
            found.append(((match[1], int(match[2] or 0)), path))
    return [path for _, path in sorted(found)]
