"""A real HTTP server on 127.0.0.1 that serves model files the ways hosts do, for the pull tests.

Paths, each `/<mode>/<name>` for a file registered with `add(name, data)`:
- `files`: Range support (206), Content-Length, an ETag. Per file, whatever the mode:
  `ignore_range` answers 200 with the whole file, as some hosts do, and an armed cut (`cuts`,
  `cut_at`) drops the connection after `cut_at` bytes, then the file is served normally, so a
  rerun can resume;
- `held`: sends the first half, then waits for `release` (a threading.Event) before the rest:
  the test decides when the download may end, without sleeps;
- `nolength`: no Content-Length, the body ends when the connection closes (HTTP/1.0 style);
- `huge`: HEAD declares a size far beyond any disk;
- `html`: a web page, labelled text/html; `mislabelled`: the same page as octet-stream;
- `auth`: 401 unless `Authorization: Bearer <token>`.
`published` makes the hub state another sha256 for a file than its bytes have.
The fake Hugging Face hub: `/api/models/<owner>/<repo>` lists `repos[repo]` (siblings with
size and LFS sha256, or 401 for a gated one without the token), and
`/<owner>/<repo>/resolve/main/<path>` redirects to `/files/<name>` with `X-Linked-Etag` and
`X-Linked-Size`, as the hub does before its CDN. Every request is kept in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

PAGE = b"<!doctype html><html><head><title>Sign in</title></head><body>" + b"x" * 4096 + b"</body></html>"


@dataclass
class Repo:
    files: dict[str, str]  # path in the repository -> name of a registered file
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class Files:
    """What the server serves and what it saw; shared with its handler threads."""

    data: dict[str, bytes] = field(default_factory=dict)
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cuts: dict[str, int] = field(default_factory=dict)  # name -> cuts left
    cut_at: dict[str, int] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)
    published: dict[str, str] = field(default_factory=dict)  # a sha256 the hub states in place of the real one
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)  # set once a held download paused
    token: str = "hf_secret_token"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, data: bytes) -> str:
        self.data[name] = data
        return hashlib.sha256(data).hexdigest()

    def gets(self, name: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(f"/{name}")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    files: Files

    def log_message(self, format: str, *args: object) -> None:  # the test output stays clean
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        files = self.files
        path = unquote(urlsplit(self.path).path)
        with files.lock:
            files.requests.append(Request(self.command, path, self.headers.get("Range"),
                                          self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:
            return self._listing(f"{parts[2]}/{parts[3]}")
        if len(parts) >= 5 and parts[2:4] == ["resolve", "main"]:
            return self._resolve(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), head)
        if len(parts) != 2 or parts[1] not in files.data and parts[0] not in ("html", "mislabelled"):
            return self._answer(404, b"not found", "text/plain", head)
        mode, name = parts
        if mode in ("html", "mislabelled"):
            return self._answer(200, PAGE, "text/html" if mode == "html" else "application/octet-stream", head)
        if mode == "auth" and self.headers.get("Authorization") != f"Bearer {files.token}":
            return self._answer(401, b"unauthorized", "text/plain", head)
        data = files.data[name]
        if mode == "huge" and head:
            return self._headers(200, "application/octet-stream", 10**15)
        if mode == "nolength":
            return self._unsized(data, head)
        start = self._range_start() if name not in files.ignore_range else 0
        if start is not None and start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        body = data[start or 0:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return None
        if self._take_cut(name):
            self.wfile.write(body[:files.cut_at[name] - (start or 0)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return None
        if mode == "held":
            half = len(body) // 2
            self.wfile.write(body[:half])
            self.wfile.flush()
            files.held.set()
            files.release.wait()
            body = body[half:]
        self.wfile.write(body)
        return None

    def _take_cut(self, name: str) -> bool:
        with self.files.lock:
            left = self.files.cuts.get(name, 0)
            if left:
                self.files.cuts[name] = left - 1
            return bool(left)

    def _range_start(self) -> int | None:
        given = self.headers.get("Range", "")
        if given.startswith("bytes=") and given.endswith("-") and given[6:-1].isdigit():
            return int(given[6:-1])
        return None

    def _unsized(self, data: bytes, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if not head:
            self.wfile.write(data)

    def _listing(self, repo_name: str) -> None:
        repo = self.files.repos.get(repo_name)
        if repo is None:
            return self._answer(404, b'{"error": "Repository not found"}', "application/json", False)
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.files.token}":
            return self._answer(401, b'{"error": "Access to model is restricted"}', "application/json", False)
        siblings = [{"rfilename": "README.md", "size": 10}]
        for path, name in repo.files.items():
            data = self.files.data[name]
            siblings.append({"rfilename": path, "size": len(data), "lfs": {"sha256": self._sha256(name), "size": len(data)}})
        return self._answer(200, json.dumps({"id": repo_name, "siblings": siblings}).encode(), "application/json",
                            False)

    def _resolve(self, repo_name: str, path: str, head: bool) -> None:
        repo = self.files.repos.get(repo_name)
        name = repo.files.get(path) if repo else None
        if repo is None or name is None:
            return self._answer(404, b"Entry not found", "text/plain", head)
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.files.token}":
            return self._answer(401, b"Access to model is restricted", "text/plain", head)
        data = self.files.data[name]
        self.send_response(302)
        self.send_header("Location", f"/files/{name}")
        self.send_header("X-Linked-Etag", f'"{self._sha256(name)}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def _sha256(self, name: str) -> str:
        return self.files.published.get(name) or hashlib.sha256(self.files.data[name]).hexdigest()

    def _headers(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _answer(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        self._headers(status, content_type, len(body))
        if not head:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that left mid-download (a cancelled pull) is expected here, not a failure."""


class FileServer:
    """The server running on a thread of its own; `url` is its base address."""

    def __init__(self) -> None:
        self.files = Files()
        handler = type("Handler", (_Handler,), {"files": self.files})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-file-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.files.release.set()  # a held download must not outlive the test
        self._server.shutdown()
        self._server.server_close()
