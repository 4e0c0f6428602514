"""A local Hugging Face Hub: a real HTTP server on 127.0.0.1 that answers what the
`huggingface_hub` client (2.x, plain LFS transfers: set HF_HUB_DISABLE_XET=1) sends when it
creates a repo, commits files and lists them.

Endpoints (checked against huggingface_hub's hf_api.py, _commit_api.py and lfs.py):
  GET  /api/whoami-v2
  POST /api/repos/create                                  {name, organization, visibility, type}
  GET  /api/{type}s/{repo}[/revision/{rev}]               repo info with `sha`
  POST /api/{type}s/{repo}/branch/{branch}                {startingPoint}
  POST /api/{type}s/{repo}/preupload/{rev}                {files: [{path, sample, size}]}
  POST /api/validate-yaml                                 {content, repoType}
  POST /{prefix}{repo}.git/info/lfs/objects/batch         git-lfs batch API, sha256 oids
  PUT  /lfs-upload/{oid}?sig=...                          the signed upload URL the batch hands out
  POST /lfs-verify/{oid}                                  {oid, size}
  POST /api/{type}s/{repo}/commit/{rev}                   application/x-ndjson
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]            ?recursive, paginated with a Link header
  POST /api/{type}s/{repo}/paths-info/{rev}               form: paths=..., expand=...

Every request but the signed upload needs `Authorization: Bearer <token>` (401 otherwise, as the
Hub answers a bad token). LFS objects and regular file contents are stored on disk under `root`;
uploads are checked against the size and sha256 promised in the batch call. Faults:
`drop_next_upload` closes the connection part-way through the next upload body;
`stall_next_upload` holds it part-way until `release_stall`, so a test can kill the client then.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Uploaded as LFS like the Hub's default .gitattributes does, besides binary samples and big files.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".npy", ".npz", ".parquet",
                ".png", ".zip", ".tar", ".gz")
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # the Hub sends files over 10 MB to LFS
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"
READ_CHUNK = 64 * 1024


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    blob_id: str  # git sha1 of the content, or of the LFS pointer for an LFS file
    lfs_oid: str | None  # sha256 of the content for LFS files

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": self.path, "size": self.size, "oid": self.blob_id}
        if self.lfs_oid is not None:
            pointer_size = len(lfs_pointer(self.lfs_oid, self.size))
            entry["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": pointer_size}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class UploadAttempt:
    oid: str
    received: int
    completed: bool


class HubError(Exception):
    """An error answer: status, body {"error": message} and the Hub's X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubServer:
    """Start with `with HubServer(tmp_path, token) as hub:`; `hub.endpoint` is its base URL."""

    def __init__(self, root: Path, token: str, *, user: str = "tester", orgs: tuple[str, ...] = ("shipkit-org",),
                 tree_page_size: int = 1000) -> None:
        self.root, self.token, self.user, self.orgs = Path(root), token, user, orgs
        self.tree_page_size = tree_page_size
        self.repos: dict[str, Repo] = {}
        self.uploads: list[UploadAttempt] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._uploads_in_flight = 0
        self._uploads_settled = threading.Condition(self.lock)
        self._expected: dict[str, tuple[int, str]] = {}  # oid -> (size, signature) from the batch call
        self._faults: dict[str, int] = {}  # "drop" / "stall" -> body bytes after which it fires, once
        self.stalled = threading.Event()
        self._release = threading.Event()
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    # fault injection
    def drop_next_upload(self, after_bytes: int) -> None:
        """Close the connection once, in the first upload whose body reaches `after_bytes`."""
        self._faults["drop"] = after_bytes

    def stall_next_upload(self, after_bytes: int) -> None:
        """Hold the first upload whose body reaches `after_bytes` (sets `stalled`) until
        `release_stall`; the client can be killed meanwhile."""
        self._faults["stall"] = after_bytes

    def _take_fault(self, kind: str, received: int) -> bool:
        with self.lock:
            if kind in self._faults and received >= self._faults[kind]:
                del self._faults[kind]
                return True
            return False

    def release_stall(self) -> None:
        self._release.set()

    # inspection for tests
    def head(self, repo_id: str, revision: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        stored = self.head(repo_id, revision).files[path]
        if stored.lfs_oid is not None:
            return (self.root / "lfs" / stored.lfs_oid).read_bytes()
        return (self.root / "blobs" / stored.blob_id).read_bytes()

    def has_lfs_object(self, oid: str) -> bool:
        return (self.root / "lfs" / oid).is_file()

    def wait_for_uploads_to_settle(self, timeout: float) -> bool:
        """Wait until no upload body is being received (a killed client's upload has ended)."""
        with self._uploads_settled:
            return self._uploads_settled.wait_for(lambda: self._uploads_in_flight == 0, timeout=timeout)

    def completed_uploads(self) -> list[str]:
        return [attempt.oid for attempt in self.uploads if attempt.completed]

    # repository state
    def create_repo(self, repo_id: str, repo_type: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = Repo(repo_id, repo_type, private)
            blob_id = self._store_blob(GITATTRIBUTES)
            files = {".gitattributes": StoredFile(".gitattributes", len(GITATTRIBUTES), blob_id, None)}
            self._add_commit(repo, "main", None, "initial commit", "", files)
            self.repos[repo_id] = repo
            return True

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, summary: str, description: str,
                    files: dict[str, StoredFile]) -> Commit:
        seed = json.dumps([repo.repo_id, parent, summary, sorted(f.blob_id for f in files.values()),
                           len(repo.commits)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, summary, description, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _store_blob(self, content: bytes) -> str:
        blob_id = git_blob_sha1(content)
        (self.root / "blobs" / blob_id).write_bytes(content)
        return blob_id


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the connection was dropped on purpose or by the client
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        try:
            if method == "PUT" and path.startswith("/lfs-upload/"):
                self._upload(path.removeprefix("/lfs-upload/"), query)
                return
            self._check_token()
            body = self._read_body() if method == "POST" else b""
            self._send_json(200, self._route(method, path, query, body))
        except HubError as error:
            self._send_error(error)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Any:
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            return {"type": "user", "name": hub.user, "auth": {"type": "access_token"},
                    "orgs": [{"name": org, "type": "org"} for org in hub.orgs]}
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return _validate_yaml(json.loads(body)["content"])
        if match := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            self._repo(match[1] or "models", match[2])
            return self._lfs_batch(json.loads(body))
        if method == "POST" and (match := re.fullmatch(r"/lfs-verify/([0-9a-f]{64})", path)):
            return self._lfs_verify(match[1], json.loads(body))
        match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/([a-z-]+)/([^/]+)(/.*)?)?", path)
        if match is None:
            raise HubError(404, f"no route for {method} {path}")
        repo = self._repo(match[1], match[2])
        action, revision, rest = match[3], match[4], (match[5] or "").lstrip("/")
        if method == "GET" and action in (None, "revision"):
            return self._repo_info(repo, revision or "main")
        if method == "POST" and action == "branch":
            return self._create_branch(repo, revision, json.loads(body or b"{}"))
        if method == "POST" and action == "preupload":
            return self._preupload(repo, revision, json.loads(body))
        if method == "POST" and action == "commit":
            return self._commit(repo, revision, body)
        if method == "GET" and action == "tree":
            return self._tree(repo, revision, rest, query)
        if method == "POST" and action == "paths-info":
            form = parse_qs(body.decode())
            return [entry for entry in self._entries(repo, revision, "", True) if entry["path"] in form.get("paths", [])]
        raise HubError(404, f"no route for {method} {path}")

    # auth
    def _check_token(self) -> None:
        if self.headers.get("authorization") != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    # repos and branches
    def _create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        namespace = payload.get("organization") or self.hub.user
        if namespace not in (self.hub.user, *self.hub.orgs):
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        if not self.hub.create_repo(repo_id, repo_type, payload.get("visibility") == "private"):
            raise HubError(409, "You already created this model repo", extra={"url": url})
        return {"url": url, "name": repo_id, "id": repo_id}

    def _repo(self, type_plural: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or REPO_TYPES[type_plural] != repo.repo_type:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision, revision if revision in repo.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[oid]

    def _repo_info(self, repo: Repo, revision: str) -> dict[str, Any]:
        commit = self._commit_at(repo, revision)
        return {"id": repo.repo_id, "sha": commit.oid, "private": repo.private,
                "siblings": [{"rfilename": name} for name in sorted(commit.files)]}

    def _create_branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> dict[str, Any]:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        with self.hub.lock:
            repo.branches[branch] = start.oid
        return {}

    # uploads
    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> dict[str, Any]:
        files = self._commit_at(repo, revision).files
        answer = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > REGULAR_MAX_BYTES or b"\0" in sample
            entry = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if (stored := files.get(item["path"])) is not None:
                entry["oid"] = stored.lfs_oid or stored.blob_id
            answer.append(entry)
        return {"files": answer}

    def _lfs_batch(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
            raise HubError(400, "only sha256 uploads are supported")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], item["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.has_lfs_object(oid):
                signature = secrets.token_hex(16)
                with self.hub.lock:
                    self.hub._expected[oid] = (size, signature)
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{oid}?sig={signature}", "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _upload(self, oid: str, query: dict[str, list[str]]) -> None:
        expected = self.hub._expected.get(oid)
        if expected is None or query.get("sig") != [expected[1]]:
            raise HubError(403, "Request signature does not match")
        size = expected[0]
        with self.hub.lock:
            self.hub._uploads_in_flight += 1
        try:
            self._receive_upload(oid, size)
        finally:
            with self.hub.lock:
                self.hub._uploads_in_flight -= 1
                self.hub._uploads_settled.notify_all()

    def _receive_upload(self, oid: str, size: int) -> None:
        digest, received, interrupted = hashlib.sha256(), 0, False
        partial = self.hub.root / "lfs" / f".{oid}.{secrets.token_hex(4)}.part"
        try:
            with open(partial, "wb") as handle:
                for chunk in self._body_chunks():
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if self.hub._take_fault("drop", received):
                        self._drop_connection()
                        interrupted = True
                        break
                    if self.hub._take_fault("stall", received):
                        self.hub.stalled.set()
                        self.hub._release.wait(timeout=120)
        except OSError:  # the client went away mid-body
            interrupted = True
        complete = not interrupted and received == size and digest.hexdigest() == oid
        if complete:
            partial.replace(self.hub.root / "lfs" / oid)
        else:
            partial.unlink(missing_ok=True)
        with self.hub.lock:
            self.hub.uploads.append(UploadAttempt(oid, received, complete))
        if interrupted:
            self.close_connection = True
            return
        if not complete:
            raise HubError(400, f"upload of {oid}: got {received} bytes with another sha256; expected {size} bytes")
        self._send_json(200, {})

    def _drop_connection(self) -> None:
        self.close_connection = True
        # linger 0: the close sends a reset, as a dropped network connection looks to the client
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.shutdown(socket.SHUT_RDWR)

    def _lfs_verify(self, oid: str, payload: dict[str, Any]) -> dict[str, Any]:
        stored = self.hub.root / "lfs" / oid
        if not stored.is_file() or stored.stat().st_size != payload.get("size"):
            raise HubError(404, f"object {oid} not found or of another size")
        return {}

    # commits and listings
    def _commit(self, repo: Repo, revision: str, body: bytes) -> dict[str, Any]:
        if "application/x-ndjson" not in self.headers.get("content-type", ""):
            raise HubError(400, "commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        with self.hub.lock:
            parent = self._commit_at(repo, revision)
            files = dict(parent.files)
            for line in lines[1:]:
                self._apply(files, line["key"], line["value"])
            commit = self.hub._add_commit(repo, revision, parent.oid, header["summary"],
                                          header.get("description", ""), files)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                "commitUrl": f"{self.hub.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}"}

    def _apply(self, files: dict[str, StoredFile], key: str, value: dict[str, Any]) -> None:
        path = value["path"]
        if key == "file":
            content = base64.b64decode(value["content"])
            files[path] = StoredFile(path, len(content), self.hub._store_blob(content), None)
        elif key == "lfsFile":
            oid = value["oid"]
            stored = self.hub.root / "lfs" / oid
            if not stored.is_file():
                raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does "
                                    f"not exist. For instance: {path}")
            size = stored.stat().st_size
            files[path] = StoredFile(path, size, git_blob_sha1(lfs_pointer(oid, size)), oid)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
        else:
            raise HubError(400, f"unsupported commit operation {key!r}")

    def _entries(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict[str, Any]]:
        files = self._commit_at(repo, revision).files
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                directory = prefix + "/".join(parts[:depth])
                entries.setdefault(directory, {"type": "directory", "path": directory, "size": 0,
                                               "oid": hashlib.sha1(directory.encode()).hexdigest()})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[name] = files[name].tree_entry()
        if folder and not entries:
            raise HubError(404, f"{folder} does not exist on {revision}", code="EntryNotFound")
        return [entries[key] for key in sorted(entries)]

    def _tree(self, repo: Repo, revision: str, folder: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = self._entries(repo, revision, folder, recursive)
        start = int(query.get("cursor", ["0"])[0])
        end = start + self.hub.tree_page_size
        if end < len(entries):
            next_url = (f"{self.hub.endpoint}{urlsplit(self.path).path}?recursive={str(recursive).lower()}"
                        f"&cursor={end}")
            self._link = f'<{next_url}>; rel="next"'
        return entries[start:end]

    # HTTP plumbing
    def _read_body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _body_chunks(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if len(chunk) < size:
                    raise ConnectionResetError("client closed the connection mid-chunk")
                yield chunk
        remaining = int(self.headers.get("content-length", 0))
        while remaining > 0:
            chunk = self.rfile.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise ConnectionResetError("client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if link := getattr(self, "_link", None):
            self.send_header("Link", link)
            self._link = None
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json(error.status, {"error": error.message, **error.extra}, headers)


def _validate_yaml(content: str) -> dict[str, Any]:
    """The Hub's README check: front matter must be a YAML mapping; a model-index, when present,
    must be a non-empty list whose results each name a task, a dataset and metrics."""
    match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
    if match is None:
        return {"warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
    try:
        metadata = yaml.safe_load(match[1])
    except yaml.YAMLError as error:
        raise HubError(400, f"Invalid YAML in README.md: {error}") from None
    if not isinstance(metadata, dict):
        raise HubError(400, "README.md metadata must be a YAML mapping")
    if "model-index" in metadata:
        problems = _model_index_problems(metadata["model-index"])
        if problems:
            raise HubError(400, "; ".join(problems))
    return {}


def _model_index_problems(model_index: Any) -> list[str]:
    if not isinstance(model_index, list) or not model_index:
        return ['"model-index" must be a non-empty array']
    problems = []
    for model in model_index:
        results = model.get("results") if isinstance(model, dict) else None
        if not isinstance(model, dict) or not model.get("name") or not isinstance(results, list) or not results:
            problems.append('"model-index[]" needs a name and a non-empty results array')
            continue
        for result in results:
            if not (result.get("task", {}).get("type") and result.get("dataset", {}).get("type")
                    and result.get("dataset", {}).get("name") and result.get("metrics")):
                problems.append('"model-index[].results[]" needs task.type, dataset.type/name and metrics')
            for metric in result.get("metrics") or []:
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float, str)):
                    problems.append('"metrics[]" needs a type and a value')
    return problems
