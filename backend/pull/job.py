"""One pull from start to finish: resolve the source, download every file, verify, move the
files into the model folder, record them and rescan the catalog.

A `Job` runs as one task on the backend's loop and is shared by everyone who asked for the
same pull (the registry's single flight); each follower reads its latest `PullStatus`, so a
slow reader never holds the download back. The files reach the model folder only after every
one is complete and verified and the model's GGUF header reads, and the first shard of a
split model moves last: the catalog never lists a model that is half there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from ..errors import (Cancelled, CorralError, ModelFileError, ModelNameTaken, PullError, PullInProgress,
                      PullSourceInvalid)
from ..events import EventBus, PullFailed, PullFinished, PullProgress
from ..ggufmeta import read_gguf
from ..snapshot import ModelInfo
from ..files import resolved
from .record import Pulled, PullRecord
from .sources import SHARD, Hub, RemoteFile, Source, files_of
from .status import DONE, DOWNLOADING, RESOLVING, VERIFYING, PullStatus
from .transfer import check_space, fetch, probe, size_of

log = logging.getLogger("corral.pull")

NOTIFY_EVERY_S = 0.25  # followers hear of byte progress at most this often (stage changes at once)
RATE_WINDOW_S = 5.0  # the rate and ETA are taken over the last seconds
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Target:
    """One file of the model: where it comes from, its partial file and its final place."""

    remote: RemoteFile
    partial: Path
    path: Path


@dataclass(frozen=True)
class Plan:
    """The model a resolved source becomes: its catalog name and its files, first shard first."""

    name: str
    targets: tuple[Target, ...]


def check_name(name: str) -> str:
    """A `--name`: what the catalog will call the model (file names are lower-cased there)."""
    stem = name.strip().removesuffix(".gguf")
    if not _NAME.fullmatch(stem) or SHARD.match(f"{stem}.gguf"):
        raise PullSourceInvalid(f"--name {name!r}: use letters, digits and . _ + - (no folders, not a shard "
                                "name); the model is listed under it in lower case")
    return stem


def plan(files: list[RemoteFile], folder: Path, name: str | None) -> Plan:
    """Where each file goes: its own name, or `name` (keeping a split model's shard suffix)."""
    targets = []
    for file in files:
        shard = SHARD.match(file.name)
        final = file.name
        if name is not None:
            final = f"{name}-{shard['index']}-of-{shard['count']}.gguf" if shard else f"{name}.gguf"
        # Named by the URL and the host's version of the file, so a partial from another source
        # or an older upload is never resumed into this one.
        key = hashlib.sha256(f"{file.url}\n{file.validator or ''}".encode()).hexdigest()[:12]
        targets.append(Target(file, folder / f".{file.name}.{key}.partial", folder / final))
    first = targets[0].path
    shard = SHARD.match(first.name)
    return Plan((shard["base"] if shard else first.stem).lower(), tuple(targets))


class Job:
    """One running pull; `follow` reads it, `task` runs it."""

    def __init__(self, pull_id: str, source: Source, folder: Path, name: str | None, sha256: str | None,
                 bus: EventBus, record: PullRecord, models: Callable[[], list[ModelInfo]],
                 rescan: Callable[[], Awaitable[object]], claims: dict[Path, Job]) -> None:
        self.source, self.folder, self.name, self.sha256 = source, folder, name, sha256
        self.status = PullStatus(pull_id, source.text, RESOLVING, directory=str(folder))
        self.error: CorralError | None = None
        self.plan: Plan | None = None
        self.followers = 1  # whoever started it
        self._bus, self._record, self._models, self._rescan = bus, record, models, rescan
        self._claims = claims  # the partial files each running pull writes, shared by the registry
        self._changed = asyncio.Event()
        self._notified = 0.0
        self._trailing: asyncio.TimerHandle | None = None  # a throttled update still owed to followers
        self._percent: int | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._run(), name=f"pull-{pull_id}")

    @property
    def id(self) -> str:
        return self.status.id

    # -- following -------------------------------------------------------------------------

    async def follow(self) -> AsyncIterator[PullStatus]:
        """Each new status until the end: DONE, or the error (Cancelled for a cancel)."""
        seen: PullStatus | None = None
        while True:
            changed = self._changed
            if self.status is not seen:
                seen = self.status
                yield seen
            if self.task.done():
                if self.error is not None:
                    raise self.error
                if self.status is seen:
                    return
                continue
            await changed.wait()

    def _update(self, force: bool = True, **changes: object) -> None:
        self.status = replace(self.status, **changes)  # type: ignore[arg-type]
        now = time.monotonic()
        percent = self.status.percent
        if percent is not None and percent != self._percent and self.status.status == DOWNLOADING:
            self._percent = percent
            self._bus.publish(PullProgress(model=self.status.model, pull_id=self.id, source=self.source.text,
                                           percent=percent, completed=self.status.completed, total=self.status.total))
            force = True
        if force or now - self._notified >= NOTIFY_EVERY_S:
            self._notify()
        elif self._trailing is None:
            self._trailing = asyncio.get_running_loop().call_later(NOTIFY_EVERY_S, self._notify)

    def _notify(self) -> None:
        """Wake the followers: they read the latest status."""
        if self._trailing is not None:
            self._trailing.cancel()
            self._trailing = None
        self._notified = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()

    def _bytes(self, done_before: int) -> Callable[[int], None]:
        """The progress callback of one file: `done_before` bytes of earlier files are complete."""
        first = True

        def on_disk(size: int) -> None:
            nonlocal first
            completed = done_before + size
            now = time.monotonic()
            if first:  # what an earlier run left: resumed, not downloaded now
                first = False
                self._samples.clear()
                self._update(status=DOWNLOADING, resumed=self.status.resumed + size)
            self._samples.append((now, completed))
            while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
                self._samples.popleft()
            (t0, b0), rate = self._samples[0], None
            if now > t0 and completed > b0:
                rate = (completed - b0) / (now - t0)
            total = self.status.total
            eta = (total - completed) / rate if rate and total is not None else None
            self._update(force=False, completed=completed, rate=rate, eta_s=eta)

        return on_disk

    # -- the pull --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._pull()
        except asyncio.CancelledError:
            partial = next((str(t.partial) for t in self.plan.targets if t.partial.exists()), None) if self.plan else None
            kept = f"; the partial file {partial} is kept: run the same pull again to resume" if partial else ""
            self._failed(Cancelled(f"the pull of {self.source.text} was cancelled{kept}"), partial)
        except CorralError as exc:
            self._failed(exc)
        except Exception as exc:  # a bug, not bad input: still an answer, never a silent hang
            log.exception("pull %s of %s", self.id, self.source.text)
            self._failed(PullError(f"the pull of {self.source.text} failed: {type(exc).__name__}: {exc}"))
        finally:
            for path in [p for p, job in self._claims.items() if job is self]:
                del self._claims[path]
            self._notify()

    async def _pull(self) -> None:
        hub = Hub.from_env()
        timeout = httpx.Timeout(30.0, read=60.0)
        async with httpx.AsyncClient(follow_redirects=True, timeout=timeout, headers={"User-Agent": "corral"}) as client:
            files = await files_of(self.source, client, hub)
            if self.sha256 is not None:
                if len(files) > 1:
                    raise PullSourceInvalid(f"--sha256 checks one file, and {self.source.text} is a split model of "
                                            f"{len(files)} files; leave it out (each shard is checked against the "
                                            "hash its host publishes, where it does)")
                files = [replace(files[0], sha256=self.sha256)]
            files = [await probe(client, f, hub.headers(f.url)) for f in files]
            self.plan = plan(files, self.folder, self.name)
            self._claim(self.plan)
            sizes = [f.size for f in files]
            self._update(model=self.plan.name, files=len(files),
                         total=None if None in sizes else sum(s for s in sizes if s is not None))
            before = await asyncio.to_thread(self._pulled_before, self.plan)
            if before is not None:
                self._update(status=DONE, paths=tuple(str(t.path) for t in self.plan.targets), already=True,
                             completed=before.size, total=before.size)
                self._finished(before.sha256, size=before.size, already=True)
                return
            await self._check_name(self.plan)
            await asyncio.to_thread(self._check_space, self.plan)
            digests, done = [], 0
            for target in self.plan.targets:
                self._update(file=target.path.name, sha256=target.remote.sha256)
                digests.append(await fetch(client, target.remote, target.partial, hub.headers(target.remote.url),
                                           self._bytes(done)))
                done += await asyncio.to_thread(size_of, target.partial)
        self._update(status=VERIFYING, completed=done, total=done, file=None, rate=None, eta_s=None)
        await asyncio.to_thread(self._check_header, self.plan)
        await self._check_name(self.plan)
        await asyncio.to_thread(self._install, self.plan, digests, done)
        await self._rescan()
        self._update(status=DONE, paths=tuple(str(t.path) for t in self.plan.targets))
        self._finished(tuple(digests), size=done)

    def _failed(self, error: CorralError, partial: str | None = None) -> None:
        self.error = error
        log.info("pull %s: %s", self.id, error.message)
        self._bus.publish(PullFailed(model=self.status.model, pull_id=self.id, source=self.source.text,
                                     error=error.message, cancelled=isinstance(error, Cancelled), partial=partial))

    def _claim(self, plan: Plan) -> None:
        for target in plan.targets:
            other = self._claims.get(target.partial)
            if other is not None and other is not self:
                raise PullInProgress(f"pull {other.id} ({other.source.text}) is downloading {target.remote.url} into "
                                     f"{target.partial.parent} already; wait for it or cancel it")
        self._claims.update((target.partial, self) for target in plan.targets)

    def _finished(self, digests: tuple[str, ...], size: int = 0, already: bool = False) -> None:
        assert self.plan is not None
        log.info("pull %s: %s is %s", self.id, self.source.text, ", ".join(str(t.path) for t in self.plan.targets))
        self._bus.publish(PullFinished(model=self.plan.name, pull_id=self.id, source=self.source.text,
                                       files=tuple(str(t.path) for t in self.plan.targets), size=size,
                                       sha256=digests, already=already))

    # -- checks and the move into place ----------------------------------------------------

    def _pulled_before(self, plan: Plan) -> Pulled | None:
        """Blocking: the record of the same files from the same place, when they are there."""
        owner = self._record.owner(plan.targets[0].path)
        if owner is None or owner.urls != tuple(t.remote.url for t in plan.targets):
            return None
        return owner if all(t.path.exists() for t in plan.targets) else None

    async def _check_name(self, plan: Plan) -> None:
        """The model's name and files must be free: no other model of that name in the catalog's
        last scan (read on the loop), no file in the way (looked at in a thread)."""
        await asyncio.to_thread(_check_free, plan, self._models())

    @staticmethod
    def _check_space(plan: Plan) -> None:
        """Blocking: refuse before the first byte when the sizes the host told do not fit."""
        plan.targets[0].path.parent.mkdir(parents=True, exist_ok=True)
        needed = sum(t.remote.size - size_of(t.partial) for t in plan.targets if t.remote.size is not None)
        check_space(plan.targets[0].path.parent, needed, f"for {plan.name}")

    @staticmethod
    def _check_header(plan: Plan) -> None:
        """Blocking: the model's header must read as GGUF; a broken download is deleted."""
        first = plan.targets[0]
        try:
            read_gguf(first.partial)
        except ModelFileError as exc:
            for target in plan.targets:
                target.partial.unlink(missing_ok=True)
            raise PullError(f"{first.remote.url}: the downloaded file is not a usable GGUF ({exc.reason}); it was "
                            "deleted and is not kept as a model") from None

    def _install(self, plan: Plan, digests: list[str], size: int) -> None:
        """Blocking: move the files into place, first shard last, and record them."""
        for target in (*plan.targets[1:], plan.targets[0]):
            os.replace(target.partial, target.path)
        self._record.add(Pulled(name=plan.name, source=self.source.text,
                                files=tuple(str(resolved(t.path)) for t in plan.targets),
                                urls=tuple(t.remote.url for t in plan.targets), sha256=tuple(digests),
                                size=size, pulled_at=time.time()))


def _check_free(plan: Plan, models: list[ModelInfo]) -> None:
    """Blocking: ModelNameTaken when another model has the name or a file is in the way."""
    mine = {resolved(t.path) for t in plan.targets}
    taken = next((m for m in models if m.name == plan.name and (m.path is None or resolved(Path(m.path)) not in mine)),
                 None)
    if taken is not None:
        where = f" ({taken.source}: {taken.path})" if taken.path else f" ({taken.source})"
    else:
        existing = next((t.path for t in plan.targets if t.path.exists()), None)
        if existing is None:
            return
        where = f" (the file {existing} exists)"
    raise ModelNameTaken(f"a model named {plan.name!r} is already there{where}; pull it under another name "
                         "with --name NAME")
