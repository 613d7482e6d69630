"""A running backend's configuration: reload on request or when the watched file changes,
versions, and rollback. Each change is parsed, validated, diffed and applied by the manager
(reconfig.py) one at a time, and recorded as a version (versions.py).

A mixin of `LocalBackend` (local.py), kept apart as its own concern."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .events import ConfigApplied, ConfigRejected, Notice
from .files import write_atomic
from .versions import ConfigVersion, diff_settings

if TYPE_CHECKING:
    from .local import LocalBackend

CONFIG_SETTLE_S = 0.5  # a watched config file is read once it stayed the same this long
CONFIG_SETTLE_TRIES = 8
# How often the watcher's thread wakes to look for changes and for its stop: watchfiles'
# default, 50 ms, is 20 wake-ups a second, each taking the GIL, in a console idle all day.
# A change is read this much later at most, and close() waits up to this for the thread.
WATCH_STEP_MS = 200



def welcome_message(file: Path, folder_exists: bool) -> str:
    """The first run's line: where the config file would go and how models come in."""
    later = "" if folder_exists else " (after making its folder, run `corral reload` or restart)"
    return (f"Welcome: no config file yet, so corral runs on its defaults; {file} is read when it "
            f"appears{later}. Models: .gguf files in model_dirs, `corral pull hf://owner/repo:Q4_K_M` "
            "(g in the console), and what ollama, the Hugging Face cache and LM Studio keep, where it is")

class LiveConfig:
    async def reload_config(self: LocalBackend, source: str = "api") -> ConfigVersion:
        """Read the config file again and apply what changed; an invalid file changes nothing
        (ConfigError, and a `config_rejected` event says why)."""
        await self.ready()
        return await self._call(self._apply_text(None, source))

    async def rollback_config(self: LocalBackend, number: int, source: str = "api") -> ConfigVersion:
        """Apply version `number` again, as a new version, and write its text back to the
        file so that the file stays the truth (a later reload keeps the rollback)."""
        await self.ready()
        version = self.history.get(number)
        return await self._call(self._apply_text(version.text, source, rollback_of=version))

    async def config_versions(self: LocalBackend) -> list[ConfigVersion]:
        return self.history.all()

    async def _apply_text(self: LocalBackend, text: str | None, source: str, rollback_of: ConfigVersion | None = None,
                          *, watched: bool = False) -> ConfigVersion:
        """On the backend loop, one change at a time: parse, validate, diff, apply, record.

        `watched`: the file watcher saw it change. Editors and scripts often truncate a file
        and then write it, or write it in pieces, so the watcher reads it once it has stayed
        the same for CONFIG_SETTLE_S, and an empty file in place of a non-empty one is not
        applied from the watcher (a notice says so; `corral reload` applies it on purpose)."""
        assert self._config_lock is not None
        async with self._config_lock:
            try:
                if self._source is None:
                    raise ConfigError("this backend was started with settings, not a config file: "
                                      "there is nothing to reload")
                if rollback_of is None:
                    text = await (self._settled_text() if watched else asyncio.to_thread(self._source.read_text))
                if watched and not (text or "").strip() and (self.history.current.text or "").strip():
                    self.bus.publish(Notice(level="warning", message=(
                        f"{self._source.file} is empty now: not applied from the file watcher, since a "
                        "file being rewritten is briefly empty; to apply an empty config on purpose, "
                        "run `corral reload`")))
                    return self.history.current
                new = self._source.parse(text)
                current = self.history.current
                diff = diff_settings(current.settings, new)
                if not diff and rollback_of is None:
                    return current
                actions = await self.manager.apply_settings(new)
            except ConfigError as exc:
                self.bus.publish(ConfigRejected(source=source, error=exc.message))
                raise
            if rollback_of is not None and text is not None:
                await asyncio.to_thread(write_atomic, self._source.file, text)
            self.settings = new
            source = f"{source} (rollback to {rollback_of.number})" if rollback_of else source
            version = self.history.record(new, text, source, diff, actions)
            self.bus.publish(ConfigApplied(version=version.number, source=source, diff=tuple(diff),
                                           actions=tuple(actions)))
            return version

    async def _settled_text(self: LocalBackend) -> str | None:
        """The config file's text once two reads CONFIG_SETTLE_S apart agree (bounded: a file
        rewritten without pause is taken as last read)."""
        assert self._source is not None
        text = await asyncio.to_thread(self._source.read_text)
        for _ in range(CONFIG_SETTLE_TRIES):
            await asyncio.sleep(CONFIG_SETTLE_S)
            again = await asyncio.to_thread(self._source.read_text)
            if again == text:
                break
            text = again
        return text

    async def _watch_config(self: LocalBackend, file: Path) -> None:
        """Reload whenever the file changes (editors write, rename or replace it)."""
        import watchfiles

        folder = file.parent
        if not file.exists():  # a first run: say where things go, not that something is missing
            self.bus.publish(Notice(level="info", message=welcome_message(file, folder.is_dir())))
        if not folder.is_dir():
            return
        await self.ready()
        async for changes in watchfiles.awatch(folder, watch_filter=lambda _, path: Path(path) == file,
                                               recursive=False, step=WATCH_STEP_MS,
                                               stop_event=self._stop_watching):
            if changes:
                with contextlib.suppress(ConfigError):  # already published as config_rejected
                    await self._apply_text(None, "file change", watched=True)
