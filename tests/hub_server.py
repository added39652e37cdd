"""A small Hugging Face Hub-compatible HTTP server for the tests (stdlib only, loopback only).

No Hub is reachable from the test machines and no package provides a writable one, so this
implements the part of the Hub's HTTP API that the installed ``huggingface_hub`` client
(2.x, with ``HF_HUB_DISABLE_XET=1``) and ``transformers`` actually call, as read from the
client's source (``hf_api.py``, ``_commit_api.py``, ``lfs.py``, ``file_download.py``):

- ``POST /api/repos/create``                        create_repo (409 when it exists)
- ``POST /api/validate-yaml``                       create_commit checks README.md metadata first
- ``POST /api/models/{repo}/branch/{branch}``       create_branch
- ``POST /api/models/{repo}/preupload/{rev}``       answers ``uploadMode`` "regular" or "lfs" by size
- ``POST /{repo}.git/info/lfs/objects/batch``       LFS batch: an upload href (+ verify href)
- ``PUT  /_lfs/{oid}``                              the LFS upload itself (sha256 checked)
- ``POST /{repo}.git/info/lfs/objects/verify``      LFS verify
- ``POST /api/models/{repo}/commit/{rev}``          ndjson commit (header / file / lfsFile / deletedFile)
- ``GET|HEAD /{repo}/resolve/{rev}/{path}``         downloads, with X-Repo-Commit, ETag and, for LFS
  files, X-Linked-Etag / X-Linked-Size
- ``GET /api/models/{repo}[/revision/{rev}]``       model_info
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``    list_repo_tree
- ``POST /api/models/{repo}/paths-info/{rev}``      get_paths_info

Errors carry the ``X-Error-Code`` header the client maps to its exception classes
(RepoNotFound, RevisionNotFound, EntryNotFound). Everything the server receives is recorded
(``requests``, ``uploaded_bodies``) so tests can inspect what went over the wire, and
``fail`` injects an HTTP error on one endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1000 * 1000  # files of this size or more are uploaded through LFS

_REPO_API = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_LFS = re.compile(r"^/([^/]+)/([^/]+)\.git/info/lfs/objects/(batch|verify)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid: sha256 for LFS, git sha1 otherwise."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.data), "oid": git_blob_sha1(self.data)}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: Dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: Dict[str, Dict[str, StoredFile]] = field(default_factory=dict)  # oid -> files
    messages: Dict[str, str] = field(default_factory=dict)  # oid -> commit summary

    def resolve(self, rev: str) -> Optional[str]:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


class HubState:
    """The server's data: repos, LFS objects, and a log of every request."""

    def __init__(self, token: Optional[str] = None, lfs_threshold: int = LFS_THRESHOLD) -> None:
        self.token = token  # when set, writes need "Authorization: Bearer <token>"
        self.lfs_threshold = lfs_threshold
        self.repos: Dict[str, Repo] = {}
        self.lfs_objects: Dict[str, bytes] = {}
        self.lfs_uploads: List[str] = []  # oids PUT through the LFS path
        self.lfs_verified: List[str] = []
        self.requests: List[Tuple[str, str]] = []  # (method, path)
        self.auth_headers: List[Optional[str]] = []
        self.uploaded_bodies: List[bytes] = []  # every request body received
        self.fail: Dict[str, int] = {}  # endpoint name -> status code to answer with
        self.lock = threading.Lock()
        self._counter = 0

    def new_commit_oid(self, repo_id: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{repo_id}:{self._counter}:{time.time_ns()}".encode()).hexdigest()

    def files(self, repo_id: str, rev: str = "main") -> Dict[str, bytes]:
        """The files of ``repo_id`` at ``rev``, for test assertions."""
        repo = self.repos[repo_id]
        return {p: f.data for p, f in repo.commits[repo.resolve(rev)].items()}

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        oid = self.new_commit_oid(repo_id)
        # The Hub starts every repo with a .gitattributes commit.
        repo.commits[oid] = {".gitattributes": StoredFile(b"*.safetensors filter=lfs diff=lfs "
                                                          b"merge=lfs -text\n", lfs=False)}
        repo.messages[oid] = "initial commit"
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return repo


class _Error(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubHandler(BaseHTTPRequestHandler):
    # One request per connection: stop() then really ends the service (no kept-alive
    # connection keeps answering), and the client simply opens new connections.
    protocol_version = "HTTP/1.0"
    server_version = "MiniHub/1.0"

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, err: _Error) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers)

    def _check_auth(self, required: bool) -> bool:
        """True when the request carries the server's token (or the server has none)."""
        header = self.headers.get("Authorization")
        if self.state.token is None:
            return True
        ok = header == f"Bearer {self.state.token}"
        if required and not ok:
            raise _Error(401, "Invalid credentials in Authorization header")
        return ok

    def _repo(self, ns: str, name: str, write: bool = False) -> Repo:
        repo_id = f"{unquote(ns)}/{unquote(name)}"
        repo = self.state.repos.get(repo_id)
        authorized = self._check_auth(required=write)
        if repo is None or (repo.private and not authorized):
            raise _Error(404, f"Repository Not Found for {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str:
        oid = repo.resolve(unquote(rev))
        if oid is None:
            raise _Error(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return oid

    def _maybe_fail(self, endpoint: str) -> None:
        status = self.state.fail.get(endpoint)
        if status is not None:
            raise _Error(status, f"injected failure on {endpoint}")

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        with self.state.lock:
            self.state.requests.append((self.command, url.path))
            self.state.auth_headers.append(self.headers.get("Authorization"))
            if body:
                self.state.uploaded_bodies.append(body)
        try:
            with self.state.lock:
                self._route(url.path, parse_qs(url.query), body)
        except _Error as err:
            self._error(err)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ------------------------------------------------------------------ routes
    def _route(self, path: str, query: Dict[str, List[str]], body: bytes) -> None:
        m, cmd = None, self.command
        if cmd == "POST" and path == "/api/repos/create":
            return self._create_repo(body)
        if cmd == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if cmd == "GET" and path == "/api/agent-harnesses":  # the client's agent detection
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if cmd == "PUT" and path.startswith("/_lfs/"):
            return self._lfs_put(path[len("/_lfs/"):], body)
        m = _LFS.match(path)
        if cmd == "POST" and m:
            repo = self._repo(m.group(1), m.group(2), write=True)
            return self._lfs_batch(repo, body) if m.group(3) == "batch" else self._lfs_verify(body)
        m = _RESOLVE.match(path)
        if cmd in ("GET", "HEAD") and m:
            return self._resolve(self._repo(m.group(1), m.group(2)), m.group(3), unquote(m.group(4)))
        m = _REPO_API.match(path)
        if m:
            repo_write = cmd == "POST"
            repo = self._repo(m.group(1), m.group(2), write=repo_write)
            rest = m.group(3) or ""
            action, _, arg = rest.partition("/")
            if cmd == "GET" and rest == "":
                return self._model_info(repo, "main")
            if cmd == "GET" and action == "revision":
                return self._model_info(repo, arg)
            if cmd == "GET" and action == "tree":
                rev, _, sub = arg.partition("/")
                return self._tree(repo, rev, unquote(sub), query)
            if cmd == "POST" and action == "paths-info":
                return self._paths_info(repo, arg, body)
            if cmd == "POST" and action == "preupload":
                return self._preupload(repo, arg, body)
            if cmd == "POST" and action == "commit":
                return self._commit_files(repo, arg, body)
            if cmd == "POST" and action == "branch":
                return self._create_branch(repo, unquote(arg), body)
        raise _Error(404, f"MiniHub does not serve {cmd} {path}")

    def _create_repo(self, body: bytes) -> None:
        self._check_auth(required=True)
        self._maybe_fail("create")
        payload = json.loads(body or b"{}")
        if payload.get("type") not in (None, "model"):
            raise _Error(400, "MiniHub serves model repos only")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.base_url}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.state.create_repo(repo_id, private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        import yaml

        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---"):
            front = content.split("---", 2)[1]
            try:
                meta = yaml.safe_load(front)
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _create_branch(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch in repo.branches:
            raise _Error(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, start)
        self._json(200, {})

    def _preupload(self, repo: Repo, rev: str, body: bytes) -> None:
        self._maybe_fail("preupload")
        files = repo.commits[self._commit(repo, rev)]
        out = []
        for f in json.loads(body)["files"]:
            entry = {"path": f["path"], "shouldIgnore": False,
                     "uploadMode": "lfs" if f["size"] >= self.state.lfs_threshold else "regular"}
            if f["path"] in files:
                entry["oid"] = files[f["path"]].oid
            out.append(entry)
        self._json(200, {"files": out, "commitOid": repo.resolve(unquote(rev))})

    def _lfs_batch(self, repo: Repo, body: bytes) -> None:
        self._maybe_fail("lfs_batch")
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise _Error(400, "MiniHub's LFS batch endpoint handles uploads only")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:  # already stored: no actions
                entry["actions"] = {
                    "upload": {"href": f"{self.base_url}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.base_url}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        self._maybe_fail("lfs_put")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Error(400, f"LFS upload for {oid}: content does not match its sha256")
        self.state.lfs_objects[oid] = body
        self.state.lfs_uploads.append(oid)
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, body: bytes) -> None:
        payload = json.loads(body)
        data = self.state.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise _Error(422, f"LFS object {payload['oid']} was not uploaded")
        self.state.lfs_verified.append(payload["oid"])
        self._json(200, {})

    def _commit_files(self, repo: Repo, rev: str, body: bytes) -> None:
        self._maybe_fail("commit")
        if "x-ndjson" not in (self.headers.get("Content-Type") or ""):
            raise _Error(400, "commit expects an application/x-ndjson body")
        branch = unquote(rev)
        if branch not in repo.branches:
            raise _Error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[branch]])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _Error(400, f"{value['path']}: unsupported encoding")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise _Error(422, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _Error(404, f"A file with this name doesn't exist: {value['path']}",
                                 "EntryNotFound")
            else:
                raise _Error(400, f"MiniHub does not handle commit operation {key!r}")
        oid = self.state.new_commit_oid(repo.repo_id)
        repo.commits[oid] = files
        repo.messages[oid] = summary
        repo.branches[branch] = oid
        self._json(200, {"commitUrl": f"{self.base_url}/{repo.repo_id}/commit/{oid}",
                         "commitOid": oid, "pullRequestUrl": None, "success": True})

    def _resolve(self, repo: Repo, rev: str, path: str) -> None:
        oid = self._commit(repo, rev)
        stored = repo.commits[oid].get(path)
        headers = {"X-Repo-Commit": oid}
        if stored is None:
            headers.update({"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            return self._json(404, {"error": "Entry not found"}, headers)
        if stored.lfs:
            headers.update({"ETag": f'"{stored.sha256}"', "X-Linked-Etag": f'"{stored.sha256}"',
                            "X-Linked-Size": str(len(stored.data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(stored.data)}"'
        self._send(200, stored.data, headers, content_type="application/octet-stream")

    def _model_info(self, repo: Repo, rev: str) -> None:
        oid = self._commit(repo, rev)
        files = repo.commits[oid]
        self._json(200, {
            "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "sha": oid,
            "private": repo.private, "gated": False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    def _tree(self, repo: Repo, rev: str, sub: str, query: Dict[str, List[str]]) -> None:
        files = repo.commits[self._commit(repo, rev)]
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entries.append(files[path].tree_entry(path))
        entries += [{"type": "directory", "path": f, "oid": git_blob_sha1(f.encode())}
                    for f in sorted(folders)]
        if sub and not entries:
            raise _Error(404, f"{sub} does not exist", "EntryNotFound")
        self._json(200, entries)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> None:
        files = repo.commits[self._commit(repo, rev)]
        form = parse_qs(body.decode())
        paths = form.get("paths", [])
        self._json(200, [files[p].tree_entry(p) for p in paths if p in files])


class MiniHub:
    """``with MiniHub() as hub:`` serves on 127.0.0.1 at a free port; ``hub.url`` is the endpoint."""

    def __init__(self, token: Optional[str] = None, lfs_threshold: int = LFS_THRESHOLD,
                 port: int = 0) -> None:
        self.state = HubState(token=token, lfs_threshold=lfs_threshold)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), HubHandler)
        self._server.daemon_threads = True
        self._server.state = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "MiniHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MiniHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # python tests/hub_server.py [--port N]: serve until interrupted
    import argparse

    parser = argparse.ArgumentParser(description="a local Hub-compatible server for trying uploads")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    hub = MiniHub(port=parser.parse_args().port).start()
    print(f"MiniHub serving at {hub.url} (set HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
