"""Applied configurations as numbered versions, and the diff between two of them.

Every settings object the backend applies (the one it started with, each reload, each
rollback) becomes a `ConfigVersion` with its time, source and diff, so an operator can see
what changed, when and why, and go back. Versions live for the process (the file on disk is
the lasting record); the newest `MAX_VERSIONS` are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .errors import NotFound

MAX_VERSIONS = 100
SECRET_KEYS = frozenset({"server.api_key"})


@dataclass(frozen=True)
class ConfigVersion:
    number: int
    applied_at: float  # unix time
    source: str  # "start", "file change", "api", "signal", "console", "rollback to 3"
    diff: tuple[str, ...]  # one line per changed key: "defaults.keep_alive: 300.0 → 60.0"
    actions: tuple[str, ...]  # what applying it did: "tiny: reloading for n_ctx", ...
    settings: Settings | None  # None where only the summary crossed HTTP (a remote backend)
    text: str | None  # the file's text it came from (None: no file)

    def to_dict(self, *, with_settings: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"number": self.number, "applied_at": self.applied_at, "source": self.source,
                                "diff": list(self.diff), "actions": list(self.actions)}
        if with_settings and self.settings is not None:
            data["settings"] = self.settings.model_dump(mode="json", by_alias=True)
            data["text"] = self.text
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigVersion:
        """The summary form (what a remote backend receives); settings stay on the server."""
        return cls(int(data["number"]), float(data["applied_at"]), str(data["source"]),
                   tuple(data.get("diff", ())), tuple(data.get("actions", ())), None, data.get("text"))


class ConfigHistory:
    """The numbered versions, oldest first; numbers never repeat within a process."""

    def __init__(self) -> None:
        self._versions: list[ConfigVersion] = []

    def record(self, settings: Settings, text: str | None, source: str, diff: list[str],
               actions: list[str]) -> ConfigVersion:
        number = self._versions[-1].number + 1 if self._versions else 1
        version = ConfigVersion(number, time.time(), source, tuple(diff), tuple(actions), settings, text)
        self._versions.append(version)
        del self._versions[:-MAX_VERSIONS]
        return version

    @property
    def current(self) -> ConfigVersion:
        return self._versions[-1]

    def all(self) -> list[ConfigVersion]:
        return list(self._versions)

    def get(self, number: int) -> ConfigVersion:
        for version in self._versions:
            if version.number == number:
                return version
        known = ", ".join(str(v.number) for v in self._versions) or "none"
        raise NotFound(f"config version {number} does not exist (kept versions: {known}); "
                       "list them with `corral config history`")


def diff_settings(old: Settings, new: Settings) -> list[str]:
    """Human lines for every key that differs; list entries are matched by their `name`, and
    an entry added or removed is one line, not one per key."""
    changes = _changes(_flat(old), _flat(new))
    whole = {key for key in changes if key.endswith("]")}  # entries added or removed
    lines = []
    for key, (a, b) in sorted(changes.items()):
        if key in whole:
            lines.append(f"{key}: {'added' if a is None else 'removed'}")
        elif key in SECRET_KEYS:  # diffs travel to event logs and screens: say that, not what
            lines.append(f"{key}: changed (hidden)")
        elif not any(key.startswith(entry + ".") for entry in whole):
            lines.append(f"{key}: {_show(a)} → {_show(b)}")
    return lines


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def _flat(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _walk(settings.model_dump(mode="json", by_alias=True), "", out)
    return out


def _walk(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = value
        for key, inner in value.items():
            _walk(inner, f"{prefix}.{key}" if prefix else key, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        for item in value:
            entry = f"{prefix}[{item['name']}]"
            out[entry] = True
            _walk({k: v for k, v in item.items() if k != "name"}, entry, out)
    elif value != []:  # an empty list reads as unset, so entries appearing show only as added
        out[prefix] = value


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)
