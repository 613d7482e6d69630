"""The pulls of one backend: started, shared, cancelled, listed; and `rm` of pulled models.

Single flight: a pull of a source into a folder that is already running is joined, not started
again, and everyone who joined reads the same progress. A pull runs while anyone follows it:
when the last follower leaves (Ctrl+C, a closed connection) it is cancelled, as it is by
`cancel` (the admin API's DELETE, the console), and its partial file stays for a resume.
Everything here runs on the backend's loop.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import DEFAULT_MODEL_NAME
from ..config import Settings, catalog_dirs
from ..errors import BadRequest, ModelNotFound, NotFound, NotPulled, PullInProgress, PullSourceInvalid
from ..events import EventBus, ModelRemoved
from ..snapshot import ModelInfo
from .job import Job, check_name
from ..files import resolved
from .record import Pulled, PullRecord
from .sources import parse_source
from .status import PullStatus

if TYPE_CHECKING:
    from ..manager import Manager

_SHA256 = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_WHOSE = {"default": f"the bundled default model {DEFAULT_MODEL_NAME} (from its Python package)",
          "config": "a [[models]] entry of the config", "dir": "a file in a model folder",
          "ollama": "a model in ollama's store", "huggingface": "a file in the Hugging Face cache",
          "lmstudio": "a model in LM Studio's folder"}
# How to delete a model that belongs to another tool: with that tool, so its own records stay right.
_DELETE_WITH = {"ollama": "`ollama rm {name}`", "huggingface": "`huggingface-cli delete-cache`",
                "lmstudio": "LM Studio's My Models page"}


class Pulls:
    """Running pulls by (source, folder), and the record of what was pulled."""

    def __init__(self, manager: Manager, bus: EventBus, record: PullRecord) -> None:
        self._manager, self._bus, self.record = manager, bus, record
        self._jobs: dict[tuple[str, str], Job] = {}
        self._claims: dict[Path, Job] = {}  # partial files being written, so two pulls never share one

    async def start(self, source: str, *, name: str | None = None, sha256: str | None = None,
                    directory: str | Path | None = None) -> Job:
        """Start a pull, or join the same one already running; bad input fails here, before
        anything is downloaded. The caller follows the job and must `leave` it."""
        parsed = parse_source(source)
        name = check_name(name) if name is not None else None
        digest = _check_sha256(sha256)
        folder = await asyncio.to_thread(target_folder, self._manager.settings, directory)
        key = (parsed.text, str(folder))
        job = self._jobs.get(key)
        if job is not None and not job.task.done():
            if (job.name, job.sha256) != (name, digest):
                raise PullInProgress(f"{parsed.text} is being pulled into {folder} already (pull {job.id}, as "
                                     f"{job.status.model or job.name or 'its own name'}); wait for it or cancel it")
            job.followers += 1
            return job
        job = Job(uuid.uuid4().hex[:12], parsed, folder, name, digest, self._bus, self.record, self._manager.models,
                  self._manager.rescan, self._claims)
        self._jobs[key] = job
        job.task.add_done_callback(lambda _: self._jobs.pop(key) if self._jobs.get(key) is job else None)
        return job

    def leave(self, job: Job) -> None:
        """A follower is gone; the last one's leaving cancels the pull."""
        job.followers -= 1
        if job.followers <= 0:
            job.task.cancel()

    def running(self) -> list[PullStatus]:
        return [job.status for job in self._jobs.values() if not job.task.done()]

    async def cancel(self, pull_id: str) -> PullStatus:
        """Cancel a running pull for everyone following it; returns once it has stopped."""
        job = next((j for j in self._jobs.values() if j.id == pull_id), None)
        if job is None:
            running = ", ".join(j.id for j in self._jobs.values()) or "none"
            raise NotFound(f"no running pull {pull_id!r} (running: {running})")
        job.task.cancel()
        await asyncio.wait({job.task})
        return job.status

    async def close(self) -> None:
        """Cancel every pull and wait for them (the backend is closing)."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.task.cancel()
        if jobs:
            await asyncio.wait({job.task for job in jobs})

    async def remove(self, name: str) -> list[str]:
        """Delete a pulled model's files (every shard) and forget it; NotPulled for a model
        whose files corral did not download, naming whose they are and where."""
        models = self._manager.models()
        info = next((m for m in models if m.name == name), None)
        if info is None:
            raise ModelNotFound(name, [m.name for m in models])
        owner = await asyncio.to_thread(self.record.owner, Path(info.path)) if info.path else None
        if owner is None or info.source == "alias":
            raise NotPulled(_not_pulled(info))
        if info.state != "available":
            await self._manager.evict(name, force=True)
        removed = await asyncio.to_thread(_delete, self.record, owner)
        await self._manager.rescan()
        self._manager.forget(name)
        self._bus.publish(ModelRemoved(model=name, files=tuple(removed)))
        return removed


def target_folder(settings: Settings, directory: str | Path | None) -> Path:
    """Blocking: where a pull writes: `directory`, else the first model folder, else the pull
    folder. A folder the catalog does not scan is refused: its model would never be listed."""
    dirs = catalog_dirs(settings)
    if directory is None:
        return dirs[0]
    folder = Path(directory).expanduser().absolute()
    scanned = {resolved(d) for d in dirs}
    if resolved(folder) in scanned or resolved(folder.parent) in scanned:
        return folder
    raise BadRequest(f"--dir {directory}: corral lists models only from its model folders and their immediate "
                     f"subfolders ({', '.join(map(str, dirs))}); pull into one of those, or add {folder} to "
                     "model_dirs in the config")


def _check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    match = _SHA256.fullmatch(value.strip())
    if match is None:
        raise PullSourceInvalid(f"--sha256 {value!r}: a sha256 is 64 hexadecimal digits")
    return match[1].lower()


def _not_pulled(info: ModelInfo) -> str:
    if info.source == "alias":
        return (f"model {info.name!r} is an [[alias]] of {info.alias_of!r} in the config, not a file; corral rm "
                "deletes only models that corral pull downloaded: remove the alias from the config instead")
    whose = _WHOSE.get(info.source, f"a model of {info.source}")
    how = _DELETE_WITH.get(info.source)
    advice = (f"delete it with {how.format(name=info.name)}" if how else
              "delete the file yourself if you mean to (or remove its entry from the config)")
    return (f"model {info.name!r} is {whose}, {info.path}, which corral did not download; corral rm deletes only "
            f"models that corral pull downloaded: {advice}")


def _delete(record: PullRecord, owner: Pulled) -> list[str]:
    """Blocking: unlink the files (first shard first, so the catalog drops the model at once)."""
    removed = []
    for file in owner.files:
        path = Path(file)
        if path.exists():
            path.unlink()
            removed.append(file)
    record.remove(owner)
    return removed
