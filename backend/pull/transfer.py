"""Moving one file's bytes: ask the host what it is, then stream it into a partial file.

The partial file lies beside the model's final place and survives an interruption: the next
run sends `Range` for the rest (a host that ignores it and answers 200 gets a clean start
over) and first hashes what is already there, so the sha256 covers the whole file. The first
bytes must be GGUF's magic, so an HTML page (a login wall, a repository's web page) stops the
download at once. Free space is checked before the first byte and again before each write.

Network reads run on the event loop (httpx's async client); every file operation and the
hashing run in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx

from ..errors import InsufficientDisk, PullError, PullForbidden, PullNotFound
from ..ggufmeta import GGUF_MAGIC
from ..memory import format_bytes
from .sources import RemoteFile

READ_SIZE = 1 << 20  # hashing a resumed part: 1 MiB reads
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def check_status(response: httpx.Response, file: RemoteFile) -> None:
    """Raise the error a failed answer stands for, saying what to do about it."""
    code = response.status_code
    if code in (401, 403):
        hint = ("set HF_TOKEN to a Hugging Face token that can read the repository, and accept the model's "
                "licence on its page (a gated model)") if file.hub else "the host wants credentials corral cannot send"
        raise PullForbidden(f"{file.url}: the host refused the download (HTTP {code}); {hint}")
    if code == 404:
        raise PullNotFound(f"{file.url}: no such file on the host (HTTP 404); check the URL or the file name")
    if response.is_error:
        raise PullError(f"{file.url}: the host answered HTTP {code} {response.reason_phrase}; try again later")


def _refuse_html(response: httpx.Response, file: RemoteFile) -> None:
    if response.headers.get("content-type", "").lower().startswith("text/html"):
        raise PullError(f"{file.url}: the host sent an HTML page, not a GGUF file (a web page or a login "
                        "wall); for a file on Hugging Face use its /resolve/ URL or hf://owner/repo/file.gguf")


def _sha256_header(response: httpx.Response, trust_etag: bool) -> str | None:
    """The hub's published sha256 of the file: X-Linked-Etag (Hugging Face, on the answer
    before its redirect to the CDN) or, from the hub itself, an ETag that is a sha256."""
    for answer in (*response.history, response):
        names = ("x-linked-etag", "etag") if trust_etag else ("x-linked-etag",)
        for name in names:
            value = answer.headers.get(name, "").removeprefix("W/").strip('"').lower()
            if _HEX64.fullmatch(value):
                return value
    return None


async def probe(client: httpx.AsyncClient, file: RemoteFile, headers: dict[str, str]) -> RemoteFile:
    """`file` with the size and sha256 a HEAD request tells; a host that does not answer HEAD
    leaves them to the download. A missing file or a refusal is an error before any byte."""
    try:
        response = await client.head(file.url, headers=headers)
    except httpx.HTTPError as exc:
        raise PullError(f"{file.url}: cannot reach the host ({_reason(exc)}); check the URL and the network") from exc
    if response.status_code in (405, 501):
        return file
    check_status(response, file)
    _refuse_html(response, file)
    size = next((int(v) for a in (*response.history, response)
                 if (v := a.headers.get("x-linked-size", "")).isdigit()), None)
    if size is None and response.headers.get("content-length", "").isdigit():
        size = int(response.headers["content-length"])
    validator = next((v for a in (*response.history, response) if (v := a.headers.get("x-linked-etag"))), None)
    validator = validator or response.headers.get("etag") or response.headers.get("last-modified")
    return replace(file, size=file.size if file.size is not None else size,
                   sha256=file.sha256 or _sha256_header(response, file.hub), validator=validator)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse when `folder`'s file system has less than `needed` bytes free."""
    free = free_bytes(folder)
    if needed > free:
        raise InsufficientDisk(f"not enough disk space {what}: {format_bytes(needed)} ({needed} bytes) needed, "
                               f"{format_bytes(free)} ({free} bytes) free in {folder}; free some space or pull "
                               "into another folder (--dir)", needed=needed, free=free, path=str(folder))


class _Partial:
    """The partial file open for appending, with the sha256 of everything in it."""

    def __init__(self, path: Path, name: str, total: int | None, fresh: bool) -> None:
        """Blocking: open `path`, the partial file of `name` (emptied when `fresh`), and hash what it
        holds already."""
        self.path, self.name, self.total = path, name, total
        self.digest = hashlib.sha256()
        with open(path, "wb" if fresh else "ab"):
            pass
        with open(path, "rb") as existing:
            while block := existing.read(READ_SIZE):
                self.digest.update(block)
        self.size = path.stat().st_size
        self._handle: io.FileIO | None = io.FileIO(path, "a")
        self._lock = threading.Lock()  # a cancelled download closes the file while a write may run

    def write(self, data: bytes) -> None:
        """Blocking: check the room left, append `data` and hash it. A full disk stops it with
        the numbers; the bytes written so far stay for a resume."""
        with self._lock:
            if self._handle is None:
                raise PullError(f"{self.path}: the download was stopped")
            self._write(self._handle, data)

    def _write(self, handle: io.FileIO, data: bytes) -> None:
        if self.total is not None:
            needed, free = self.total - self.size, free_bytes(self.path.parent)
            if needed > free:
                raise self._full(needed, free)
        view = memoryview(data)
        try:
            while view:
                written = handle.write(view) or 0
                view, self.size = view[written:], self.size + written
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                left = self.total - self.size if self.total is not None else len(view)
                raise self._full(left, free_bytes(self.path.parent)) from exc
            raise PullError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.digest.update(data)

    def _full(self, needed: int, free: int) -> InsufficientDisk:
        """`needed`: what is left of the file, or (its size unknown) at least the bytes refused."""
        left = (f"{format_bytes(needed)} ({needed} bytes) still needed" if self.total is not None else
                "the host did not say how large the file is")
        return InsufficientDisk(
            f"the disk filled while writing {self.name}: {left}, {format_bytes(free)} ({free} bytes) free in "
            f"{self.path.parent}; the {format_bytes(self.size)} written so far are kept in {self.path.name}: free "
            "some space and run the same pull again to resume", needed=needed, free=free, path=str(self.path.parent))

    def close(self, sync: bool) -> None:
        """Blocking: close, after flushing to the disk when the file is complete."""
        with self._lock:
            if self._handle is None:
                return
            if sync:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


async def fetch(client: httpx.AsyncClient, file: RemoteFile, partial: Path, headers: dict[str, str],
                progress: Callable[[int], None]) -> str:
    """Download `file` into `partial`, resuming what an earlier run left there; returns its
    sha256 once the whole file is on disk. `progress` gets the bytes on disk after each write.

    Raises PullError for anything that stops it: a transfer cut short keeps the partial file (a
    rerun resumes it), a file that is not GGUF or fails its sha256 is deleted."""
    have = await asyncio.to_thread(_resumable, partial, file.size)
    if have and have == file.size:
        return await _finish(await asyncio.to_thread(_Partial, partial, file.name, file.size, False), file)
    try:
        async with client.stream("GET", file.url, headers={**headers, **_range(have)}) as response:
            if response.status_code == 416 and have:  # the host has nothing past what is here
                return await _416(response, file, partial, have)
            check_status(response, file)
            _refuse_html(response, file)
            start, total = _extent(response, have, file)
            writer = await asyncio.to_thread(_Partial, partial, file.name, total, start == 0)
            try:
                if total is not None:
                    await asyncio.to_thread(check_space, partial.parent, total - start, f"for {file.name}")
                progress(writer.size)
                await _stream(response, writer, file, progress)
            except BaseException:
                await asyncio.to_thread(writer.close, False)
                raise
    except httpx.HTTPError as exc:
        done = await asyncio.to_thread(size_of, partial)
        if not done:
            raise PullError(f"{file.url}: cannot download ({_reason(exc)}); check the URL and the network") from exc
        of = f" of {file.size}" if file.size is not None else ""
        raise PullError(f"{file.url}: the transfer stopped at {done}{of} bytes ({_reason(exc)}); the partial file "
                        f"{partial} is kept: run the same pull again to resume") from exc
    if writer.total is not None and writer.size < writer.total:
        await asyncio.to_thread(writer.close, False)
        raise PullError(f"{file.url}: the host ended the transfer at {writer.size} of {writer.total} bytes; the "
                        f"partial file {partial} is kept: run the same pull again to resume")
    return await _finish(writer, file)


def _range(have: int) -> dict[str, str]:
    return {"Range": f"bytes={have}-"} if have else {}


async def _416(response: httpx.Response, file: RemoteFile, partial: Path, have: int) -> str:
    """A resume the host answers 416: the partial is the whole file when the host's size
    (`Content-Range: bytes */SIZE`) is what is here; otherwise it is not this file's start."""
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("content-range", ""))
    if match is not None and int(match[1]) == have:
        return await _finish(await asyncio.to_thread(_Partial, partial, file.name, have, False), file)
    await asyncio.to_thread(partial.unlink, missing_ok=True)
    raise PullError(f"{file.url}: the host's file is not the one an earlier run left {have} bytes of; the partial "
                    "file was deleted: run the same pull again to start over")


def _extent(response: httpx.Response, have: int, file: RemoteFile) -> tuple[int, int | None]:
    """Where this answer starts in the file and the file's whole size (None: not told)."""
    length = response.headers.get("content-length", "")
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if match is None or int(match[1]) != have:
            raise PullError(f"{file.url}: the host answered the resume with another part of the file "
                            f"({response.headers.get('content-range')!r}); delete the partial file to start over")
        return have, int(match[3]) if match[3] != "*" else file.size
    return 0, int(length) if length.isdigit() else file.size  # 200: the whole file, from its first byte


async def _stream(response: httpx.Response, writer: _Partial, file: RemoteFile,
                  progress: Callable[[int], None]) -> None:
    """Append the body to `writer`, stopping at once when its first bytes are not GGUF."""
    head = b""
    async for chunk in response.aiter_bytes():
        if writer.size < len(GGUF_MAGIC):
            head += chunk
            if len(head) < len(GGUF_MAGIC):
                continue
            if not head.startswith(GGUF_MAGIC):
                await asyncio.to_thread(writer.close, False)
                await asyncio.to_thread(writer.path.unlink, missing_ok=True)
                raise PullError(f"{file.url}: the host sent something that is not a GGUF file (it starts with "
                                f"{head[:16]!r}, not {GGUF_MAGIC!r}); check the URL")
            chunk, head = head, b""
        await asyncio.to_thread(writer.write, chunk)
        progress(writer.size)


async def _finish(writer: _Partial, file: RemoteFile) -> str:
    """Close the complete file and check its sha256 against the expected one, if any."""
    await asyncio.to_thread(writer.close, True)
    digest = writer.digest.hexdigest()
    if file.sha256 is not None and digest != file.sha256.lower():
        await asyncio.to_thread(writer.path.unlink, missing_ok=True)
        raise PullError(f"{file.url}: sha256 mismatch: expected {file.sha256.lower()}, the download has {digest}; "
                        "the file was deleted and is not kept as a model: check the source (or --sha256)")
    return digest


def _resumable(path: Path, size: int | None) -> int:
    """Blocking: the bytes of `path` an earlier run left to build on (0: start over)."""
    have = size_of(path)
    if not have or (size is not None and have > size):
        return 0
    with open(path, "rb") as handle:
        return have if handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC else 0


def size_of(path: Path) -> int:
    """Blocking: the size of `path`, 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
