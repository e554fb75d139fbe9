"""A loopback Hugging Face Hub: the subset of the Hub's HTTP API that huggingface_hub's snapshot_download,
hf_hub_download, create_repo and create_commit use, served by http.server on 127.0.0.1 in a thread.

    with HubServer() as hub:                  # hub.url = "http://127.0.0.1:<port>"
        sha = hub.add_repo("user/saes", {"config.json": b"{}", "site/cfg.json": b"..."})
        ... HF_ENDPOINT=hub.url ...
        hub.requests, hub.bytes_sent          # what the client asked for, and the body bytes served

Served: repo info (`/api/{type}s/{repo}/revision/{rev}`), the recursive tree (`.../tree/{rev}`), file
HEAD/GET (`/{repo}/resolve/{rev}/{path}`, `/datasets/...`), repo creation, preupload, the legacy LFS batch
API with single-part PUT uploads, and the ndjson commit endpoint. Errors carry the Hub's X-Error-Code
(RepoNotFound, RevisionNotFound, EntryNotFound) so the client raises its own error types. Not served: Xet
(its content-addressed storage speaks hf_xet's binary chunk protocol), so clients must run with
HF_HUB_DISABLE_XET=1 and files go through LFS, as they did before Xet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".parquet", ".pth", ".png", ".bin")
"""Files the loopback Hub stores through LFS (like the Hub's default .gitattributes)."""


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self):
        self.repos: dict[
            tuple[str, str], dict
        ] = {}  # (type, id) -> {"refs": {name: sha}, "commits": {sha: tree}}
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self.lfs_store: dict[str, bytes] = {}  # sha256 -> bytes uploaded through PUT
        self.commits: list[dict] = []  # every commit payload received: header + operations
        self.validated: list[dict] = []  # card metadata that passed /api/validate-yaml
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent = 0

    # -- repos -------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        """Create (or replace) a repo holding `files` at a first commit on main; returns its sha."""
        self.repos[(repo_type, repo_id)] = {"refs": {}, "commits": {}}
        return self._commit(repo_type, repo_id, "main", dict(files))

    def _commit(self, repo_type: str, repo_id: str, branch: str, tree: dict[str, bytes]) -> str:
        repo = self.repos[(repo_type, repo_id)]
        digest = hashlib.sha1(
            repr((repo_id, len(repo["commits"]), sorted(tree.items()))).encode()
        ).hexdigest()
        repo["commits"][digest] = tree
        repo["refs"][branch] = digest
        return digest

    def tree(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo["commits"][repo["refs"].get(revision, revision)]


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # -- plumbing ----------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)
                with hub._lock:
                    hub.bytes_sent += len(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str, message: str, head: bool = False):
            self._send(
                status,
                json.dumps({"error": message}).encode(),
                {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                head=head,
            )

        def _repo(self, repo_type: str, repo_id: str, revision: str, head: bool = False):
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                return None, None
            sha = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                return None, None
            return sha, repo["commits"][sha]

        # -- routes ------------------------------------------------------------------------------

        def do_HEAD(self):
            self._route("HEAD")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _route(self, method: str):
            url = urlparse(self.path)
            path = unquote(url.path)
            with hub._lock:
                hub.requests.append((method, path))
            parts = path.strip("/").split("/")
            if parts[:1] == ["api"]:
                return self._api(method, parts[1:], parse_qs(url.query))
            if method == "PUT" and parts[:1] == ["lfs-upload"]:
                data = self._body()
                if hashlib.sha256(data).hexdigest() != parts[1]:
                    return self._error(400, "BadRequest", "sha256 mismatch")
                hub.lfs_store[parts[1]] = data
                return self._send(200)
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                return self._lfs_batch()
            repo_type = "model"
            if parts[0] in ("datasets", "spaces"):
                repo_type, parts = parts[0][:-1], parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(method, repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._error(404, "NotFound", f"no route for {method} {path}")

        def _api(self, method: str, parts: list[str], query):
            if method == "POST" and parts == ["validate-yaml"]:  # the card's metadata, as the Hub checks it
                return self._validate_yaml(json.loads(self._body())["content"])
            if method == "POST" and parts == ["repos", "create"]:
                body = json.loads(self._body() or b"{}")
                repo_type = body.get("type") or "model"
                repo_id = (
                    f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                )
                if (repo_type, repo_id) in hub.repos:
                    return self._error(409, "Conflict", "You already created this repo")
                hub.add_repo(repo_id, {}, repo_type)
                return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if len(parts) < 4 or parts[0] not in ("models", "datasets", "spaces"):
                return self._error(404, "NotFound", "unknown api route")
            repo_type, repo_id, verb, rest = parts[0][:-1], "/".join(parts[1:3]), parts[3], parts[4:]
            revision = rest[0] if rest else "main"
            if method == "POST" and verb == "preupload":
                sha, _ = self._repo(repo_type, repo_id, revision)
                if sha is None:
                    return
                files = json.loads(self._body())["files"]
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False,
                    }
                    for f in files
                ]
                return self._json({"files": modes})
            if method == "POST" and verb == "commit":
                return self._commit(repo_type, repo_id, revision)
            sha, tree = self._repo(repo_type, repo_id, revision)
            if sha is None:
                return
            if verb == "revision":
                siblings = [{"rfilename": p} for p in sorted(tree)]
                return self._json(
                    {
                        "id": repo_id,
                        "sha": sha,
                        "siblings": siblings,
                        "private": False,
                        "disabled": False,
                        "gated": False,
                        "tags": [],
                        "downloads": 0,
                        "likes": 0,
                    }
                )
            if verb == "tree":
                prefix = "/".join(rest[1:])
                entries, dirs = [], set()
                for p in sorted(tree):
                    if prefix and not p.startswith(prefix + "/"):
                        continue
                    entries.append(self._entry(p, tree[p]))
                    d = p.rsplit("/", 1)[0] if "/" in p else ""
                    while d and d != prefix:
                        dirs.add(d)
                        d = d.rsplit("/", 1)[0] if "/" in d else ""
                dirs_out = [
                    {"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)
                ]
                return self._json(dirs_out + entries)
            self._error(404, "NotFound", f"unknown api verb {verb}")

        def _validate_yaml(self, content: str):
            import yaml

            def bad(message: str):
                return self._json({"errors": [{"message": message}], "warnings": []}, status=400)

            if not content.startswith("---\n") or "\n---\n" not in content[4:]:
                return bad("the card has no YAML metadata block")
            try:
                meta = yaml.safe_load(content[4:].split("\n---\n", 1)[0])
            except yaml.YAMLError as e:
                return bad(f"invalid YAML metadata: {e}")
            if not isinstance(meta, dict):
                return bad("the YAML metadata must be a mapping")
            hub.validated.append(meta)
            self._json({"errors": [], "warnings": []})

        def _entry(self, path: str, data: bytes) -> dict:
            e = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
            if path.endswith(LFS_SUFFIXES):
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return e

        def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str):
            head = method == "HEAD"
            sha, tree = self._repo(repo_type, repo_id, revision, head)
            if sha is None:
                return
            if path not in tree:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head)
            data = tree[path]
            lfs = path.endswith(LFS_SUFFIXES)
            etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha(data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            if lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
            self._send(200, data, headers, head=head)

        def _lfs_batch(self):
            body = json.loads(self._body())
            objects = []
            for obj in body["objects"]:
                out = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_store:
                    out["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"}}
                objects.append(out)
            self._json({"transfer": "basic", "objects": objects})

        def _commit(self, repo_type: str, repo_id: str, revision: str):
            sha, tree = self._repo(repo_type, repo_id, revision)
            if sha is None:
                return
            lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
            hub.commits.append({"repo": repo_id, "type": repo_type, "revision": revision, "lines": lines})
            new = dict(tree)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    new[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs_store:
                        return self._error(422, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    new[value["path"]] = hub.lfs_store[value["oid"]]
                elif key == "deletedFile":
                    new.pop(value["path"], None)
                elif key == "deletedFolder":
                    new = {p: d for p, d in new.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            oid = hub._commit(repo_type, repo_id, revision, new)
            self._json(
                {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
            )

    return Handler
