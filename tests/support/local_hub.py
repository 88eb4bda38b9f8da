"""A Hugging Face hub look-alike on 127.0.0.1: serves a folder laid out as `<owner>/<name>/<path>` over real HTTP.

It answers what huggingface_hub asks of the hub's `resolve` endpoint (read from huggingface_hub's
`file_download.get_hf_file_metadata`, `http_get` and `utils/_http.hf_raise_for_status`):

- `HEAD|GET /{owner}/{name}/resolve/{revision}/{path}` with `X-Repo-Commit`; for LFS files `X-Linked-Etag` (the
  sha256 of the content) and `X-Linked-Size`; for plain git files an `ETag` that is the git blob sha1;
  `Content-Length`, and `Range: bytes=N-` answered with 206 and `Content-Range`.
- a missing file: 404 with `X-Error-Code: EntryNotFound`; a missing repo: 404 with `X-Error-Code: RepoNotFound`.

Faults for tests: `drop_once(path, after_bytes)` closes the connection mid-body on the next GET of a file;
`stall(path, after_bytes)` sends that many bytes and then waits until `release()`; `serve_short(path, size_bytes)`
announces a file's full size and hash but serves only its first bytes (a hub whose content is not what it says);
`announced` overrides the size a lookup reports and `etags` the etag, per `repo/path`.
Revisions: `main` and the repo's head commit serve the folder as it is; `push(repo, path, content)` makes a new head
commit, and the commits before it stay served at their sha (an unknown one: 404 `RevisionNotFound`).
With `cdn_ttl_s` set, `resolve` answers as huggingface.co does for LFS files: a 302 to a CDN link on another host
name (`localhost`), signed to expire that many seconds later (403 afterwards).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# The hub's default .gitattributes sends these through LFS; anything else is a plain git file.
LFS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".model", ".ckpt")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
CDN = re.compile(
    r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<revision>[0-9a-f]{40})/(?P<path>[^?]+)\?expires=(?P<expires>[0-9.]+)$"
)
SEND_CHUNK_BYTES = 256 * 1024
REVISIONS = ".revisions"  # <root>/.revisions/<commit>/<owner>/<name>/: the repos as they were at older commits


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class Fault:
    after_bytes: int
    kind: str  # "drop" (close the connection once) or "stall" (wait for release)


@dataclass
class LocalHub:
    root: Path
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    faults: dict[str, Fault] = field(default_factory=dict)
    released: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    short: dict[str, int] = field(default_factory=dict)
    announced: dict[str, int] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)
    cdn_ttl_s: float | None = None
    heads: dict[str, str] = field(default_factory=dict)  # repo → head commit, when pushed to

    def head(self, repo: str) -> str:
        return self.heads.get(repo, commit_of(repo))

    def push(self, repo: str, path: str, content: bytes) -> str:
        """A new head commit of `repo` with `path` holding `content`; the repo as it was stays served at the old
        head's sha. Returns the new head."""
        old = self.head(repo)
        shutil.copytree(self.root / repo, self.root / REVISIONS / old / repo, dirs_exist_ok=True)
        self.add_file(repo, path, content)
        self.heads[repo] = hashlib.sha1(f"{old}/{path}".encode() + content).hexdigest()
        return self.heads[repo]

    def folder(self, repo: str, revision: str) -> Path | None:
        """Where `repo` at `revision` is kept, or None for a revision it never had."""
        if revision in ("main", self.head(repo)):
            return self.root / repo
        snapshot = self.root / REVISIONS / revision / repo
        return snapshot if snapshot.is_dir() else None

    def add_file(self, repo: str, path: str, content: bytes) -> None:
        target = self.root / repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)

    def drop_once(self, repo_path: str, after_bytes: int) -> None:
        """The next GET of `repo/path` sends `after_bytes` of the body, then the connection closes."""
        self.faults[repo_path] = Fault(after_bytes, "drop")

    def stall(self, repo_path: str, after_bytes: int) -> None:
        """GETs of `repo/path` send `after_bytes` of the body, then wait for `release()` (and then finish)."""
        self.released.clear()
        self.stalled.clear()
        self.faults[repo_path] = Fault(after_bytes, "stall")

    def serve_short(self, repo_path: str, size_bytes: int) -> None:
        """`repo/path` keeps its announced size and hash, but its content served stops after `size_bytes`."""
        self.short[repo_path] = size_bytes

    def release(self) -> None:
        self.faults = {k: f for k, f in self.faults.items() if f.kind != "stall"}
        self.released.set()

    def gets(self, repo: str, path: str) -> list[Request]:
        """The GET requests made for one file, in order."""
        prefix = f"/{repo}/resolve/"
        return [r for r in self.requests if r.method == "GET" and r.path.startswith(prefix) and r.path.endswith(path)]


def commit_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()  # a stable 40-hex "commit" per repo


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet: tests read `hub.requests`
            pass

        def do_HEAD(self) -> None:
            self._resolve(send_body=False)

        def do_GET(self) -> None:
            self._resolve(send_body=True)

        def _resolve(self, *, send_body: bool) -> None:
            hub.requests.append(Request(self.command, self.path, self.headers.get("Range")))
            cdn = CDN.match(self.path)
            match = cdn or RESOLVE.match(self.path)
            if match is None:
                return self._error(404, "RepoNotFound")
            repo, path = match["repo"], match["path"]
            if cdn is not None and time.time() > float(cdn["expires"]):
                return self._error(403, "AccessDenied")
            if not (hub.root / repo).is_dir():
                return self._error(404, "RepoNotFound")
            folder = hub.folder(repo, match["revision"])
            if folder is None:
                return self._error(404, "RevisionNotFound", repo)
            commit = hub.head(repo) if match["revision"] == "main" else match["revision"]
            file = folder / path
            if not file.is_file():
                return self._error(404, "EntryNotFound", repo)
            content = file.read_bytes()
            start = 0
            if (wanted := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-", wanted)):
                start = int(m[1])
            served = content[: hub.short.get(f"{repo}/{path}", len(content))]
            if start and start >= len(served):
                return self._error(416, "RangeNotSatisfiable")
            body = served[start:]
            lfs = path.endswith(LFS_SUFFIXES)
            redirect = cdn is None and lfs and hub.cdn_ttl_s is not None
            if redirect:
                body = b""
                self.send_response(302)
                self.send_header("Location", f"{hub.url.replace('127.0.0.1', 'localhost')}/cdn/{repo}/{commit}/"
                                             f"{path}?expires={time.time() + hub.cdn_ttl_s:.3f}")  # fmt: skip
            else:
                self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            size = hub.announced.get(f"{repo}/{path}", len(content))
            if lfs:
                sha256 = hub.etags.get(f"{repo}/{path}", hashlib.sha256(content).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha1(sha256.encode()).hexdigest()}"')  # the pointer's oid
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(size))
            else:
                blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
                self.send_header("ETag", f'"{hub.etags.get(f"{repo}/{path}", blob)}"')
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body and not redirect:
                self._send_body(f"{repo}/{path}", body)

        def _send_body(self, repo_path: str, body: bytes) -> None:
            fault = hub.faults.get(repo_path)
            if fault is None:
                self.wfile.write(body)
                return
            for offset in range(0, fault.after_bytes, SEND_CHUNK_BYTES):
                self.wfile.write(body[offset : min(offset + SEND_CHUNK_BYTES, fault.after_bytes)])
            self.wfile.flush()
            if fault.kind == "drop":
                del hub.faults[repo_path]
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            hub.stalled.set()
            hub.released.wait(timeout=60)
            try:
                self.wfile.write(body[fault.after_bytes :])
            except OSError:  # the client is gone (a test killed it): nothing to finish
                self.close_connection = True

        def _error(self, status: int, code: str, repo: str | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if repo is not None:
                self.send_header("X-Repo-Commit", hub.head(repo))
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@contextmanager
def run_local_hub(root: Path) -> Iterator[LocalHub]:
    hub = LocalHub(root)
    root.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.released.set()
        server.shutdown()
        server.server_close()
