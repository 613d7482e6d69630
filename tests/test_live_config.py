"""Live configuration: reload (by call and by file watch), versions and rollback, virtual
models, warm restarts and load priority, on a LocalBackend over tiny GGUFs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.backend.local import LocalBackend
from corral.backend.config import config_source
from corral.backend.errors import ConfigError, NotFound
from corral.backend.events import ConfigApplied, ConfigRejected, Notice
from corral.backend.records import PriorityGate
from support import wait_for

BASE = """
include_default_model = false
model_dirs = [{dir!r}]

[defaults]
n_ctx = 256
n_parallel = 2
n_threads = 1
keep_alive = {keep_alive!r}
"""


@pytest.fixture
def config_file(tmp_path: Path, model_dir: Path) -> Callable[..., Path]:
    """`write(keep_alive=..., extra=...)` rewrites the config file and returns its path."""
    path = tmp_path / "corral.toml"

    def write(keep_alive: str = "-1", extra: str = "") -> Path:
        path.write_text(BASE.format(dir=str(model_dir), keep_alive=keep_alive) + extra)
        return path

    write()
    return write


@pytest.fixture
def backend(config_file: Callable[..., Path]) -> Iterator[LocalBackend]:
    with LocalBackend(config=config_source(config_file(), env={})) as local:
        yield local


def state(backend: LocalBackend, name: str) -> str:
    return {m.name: m.state for m in backend.sync.models()}[name]


def test_reload_applies_a_ttl_change_without_restart(backend: LocalBackend, config_file: Callable[..., Path]) -> None:
    backend.sync.load("tiny-a")
    time.sleep(0.3)
    assert state(backend, "tiny-a") == "ready"  # keep_alive -1: never expires
    config_file(keep_alive="0.2s")
    version = backend.sync.reload_config()
    assert version.number == 2 and version.source == "api"
    assert version.diff == ("defaults.keep_alive: -1.0 → 0.2",)
    assert any("tiny-a: keep_alive" in line for line in version.actions)
    wait_for(lambda: state(backend, "tiny-a") == "available", what="the new TTL to unload tiny-a")


def test_an_unchanged_file_makes_no_new_version(backend: LocalBackend) -> None:
    assert backend.sync.reload_config().number == 1
    assert [v.number for v in backend.sync.config_versions()] == [1]


@pytest.mark.parametrize("bad, fragment", [
    ("[defaults\n", "not valid TOML"),
    ("[server]\nprot = 3\n", "did you mean 'port'"),
    ("[[models]]\nname = 'x'\npath = '/nowhere/x.gguf'\n[[alias]]\nname = 'chatty'\nmodel = 'nope'\n",
     "alias 'chatty': its model 'nope' is not in the catalog"),
    ("[budgets]\nmax_loaded = 0\n", "budgets.max_loaded = 0"),
])
def test_an_invalid_edit_changes_nothing_and_says_why(backend: LocalBackend, config_file: Callable[..., Path],
                                                      bad: str, fragment: str) -> None:
    backend.sync.load("tiny-a")
    config_file(keep_alive="0.1s", extra=bad)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        backend.sync.reload_config()
    assert [v.number for v in backend.sync.config_versions()] == [1]
    assert backend.settings.defaults.keep_alive == -1
    time.sleep(0.3)
    assert state(backend, "tiny-a") == "ready"  # the running model kept its settings
    [rejected] = [e for e in backend.bus.recent() if isinstance(e, ConfigRejected)]
    assert fragment in rejected.error and rejected.source == "api"


def test_rollback_restores_the_previous_behaviour_and_the_file(backend: LocalBackend,
                                                                 config_file: Callable[..., Path]) -> None:
    first_text = config_file().read_text()
    config_file(keep_alive="0.2s")
    backend.sync.reload_config()
    backend.sync.load("tiny-b")
    wait_for(lambda: state(backend, "tiny-b") == "available", what="the short TTL")
    version = backend.sync.rollback_config(1)
    assert version.number == 3 and "rollback to 1" in version.source
    assert version.diff == ("defaults.keep_alive: 0.2 → -1.0",)
    assert backend._source.file.read_text() == first_text
    backend.sync.load("tiny-b")
    time.sleep(0.4)
    assert state(backend, "tiny-b") == "ready"  # the old behaviour: it stays
    with pytest.raises(NotFound, match="config version 9 does not exist"):
        backend.sync.rollback_config(9)


def test_an_n_ctx_change_drains_then_reloads(backend: LocalBackend, config_file: Callable[..., Path]) -> None:
    backend.sync.load("tiny-a")
    lease = backend.sync.run(backend._acquire("tiny-a", None))  # a request in flight
    engine = lease.engine
    config_file(extra="[[models]]\nname = 'tiny-a'\npath = '{}'\nn_ctx = 512\n".format(
        backend.manager.record("tiny-a").entry.path))
    version = backend.sync.reload_config()
    assert any("tiny-a: reloading for n_ctx" in line for line in version.actions), version.actions
    time.sleep(0.3)
    assert backend.manager.record("tiny-a").engine is engine  # still serving its request
    backend._release(lease)

    def reloaded() -> bool:
        record = backend.manager.record("tiny-a")
        return record.engine is not None and record.engine is not engine and record.state.value == "ready"

    wait_for(reloaded, what="tiny-a to reload")
    assert backend.manager.record("tiny-a").engine.n_ctx == 512


def test_a_watched_file_reloads_by_itself(config_file: Callable[..., Path]) -> None:
    with LocalBackend(config=config_source(config_file(), env={}), watch_config=True) as backend:
        backend.sync.models()
        time.sleep(0.3)  # the watcher is up
        config_file(keep_alive="7m")
        wait_for(lambda: backend.settings.defaults.keep_alive == 420, what="the watcher's reload")
        assert backend.sync.config_versions()[-1].source == "file change"


def test_a_first_run_without_a_config_file_gets_a_welcome_not_a_warning(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "nowhere"), "HOME": str(tmp_path)}
    with LocalBackend(config=config_source(env=env), watch_config=True) as backend:
        backend.sync.models()
        wait_for(lambda: any(isinstance(e, Notice) for e in backend.bus.recent()), what="the welcome")
        notices = [e for e in backend.bus.recent() if isinstance(e, Notice)]
    [welcome] = notices
    assert welcome.level == "info" and welcome.message.startswith("Welcome: no config file yet")
    assert str(tmp_path / "nowhere" / "corral" / "config.toml") in welcome.message and "corral pull" in welcome.message


def test_a_watched_file_emptied_on_its_way_to_new_text_is_never_applied_empty(
        config_file: Callable[..., Path]) -> None:
    path = config_file()
    with LocalBackend(config=config_source(path, env={}), watch_config=True) as backend:
        backend.sync.models()
        time.sleep(0.3)  # the watcher is up
        path.write_text("")  # a writer truncates first
        wait_for(lambda: any(isinstance(e, Notice) and "is empty now" in e.message for e in backend.bus.recent()),
                 what="the watcher's notice about the empty file")
        config_file(keep_alive="7m")  # ... and writes the new text later
        wait_for(lambda: backend.settings.defaults.keep_alive == 420, what="the watcher's reload")
        versions = backend.sync.config_versions()
    assert [v.diff for v in versions[1:]] == [("defaults.keep_alive: -1.0 → 420.0",)]  # no all-defaults version


def test_a_watched_file_written_slowly_in_pieces_is_applied_once_whole(config_file: Callable[..., Path]) -> None:
    path = config_file()
    whole = path.read_text().replace("keep_alive = '-1'", "keep_alive = '7m'") + "\n[budgets]\nmax_loaded = 7\n"
    lines = whole.splitlines(keepends=True)
    pieces = [lines[:3], lines[3:6], lines[6:9], lines[9:]]  # each prefix alone is valid TOML, and wrong
    with LocalBackend(config=config_source(path, env={}), watch_config=True) as backend:
        backend.sync.models()
        time.sleep(0.3)  # the watcher is up
        with path.open("w") as f:
            for piece in pieces:
                f.write("".join(piece))
                f.flush()
                time.sleep(0.08)  # longer than the watcher's own grouping of changes, shorter than the settle time
        wait_for(lambda: backend.settings.budgets.max_loaded == 7, what="the watcher's reload")
        versions = backend.sync.config_versions()
    assert len(versions) == 2 and versions[-1].text == whole
    assert sorted(versions[-1].diff) == ["budgets.max_loaded: 3 → 7", "defaults.keep_alive: -1.0 → 420.0"]


def test_two_aliases_share_one_load(backend: LocalBackend, config_file: Callable[..., Path]) -> None:
    config_file(extra=("[[alias]]\nname = 'poet'\nmodel = 'tiny-a'\nsystem = 'You write poems.'\n"
                       "params = { temperature = 0.0, max_tokens = 3 }\n"
                       "[[alias]]\nname = 'clerk'\nmodel = 'tiny-a'\n"))
    backend.sync.reload_config()
    [applied] = [e for e in backend.bus.recent() if isinstance(e, ConfigApplied)]
    assert "alias[poet]: added" in applied.diff
    backend.sync.load("poet")
    before = backend.sync.status().ram_reserved
    backend.sync.load("clerk")
    status = backend.sync.status()
    assert status.ram_reserved == before  # memory counted once
    infos = {m.name: m for m in status.models}
    assert infos["poet"].alias_of == infos["clerk"].alias_of == "tiny-a"
    assert infos["poet"].state == infos["tiny-a"].state == "ready"
    assert [m.name for m in status.models if m.state == "ready"] == ["clerk", "poet", "tiny-a"]
    assert backend.manager.record("poet") is backend.manager.record("clerk")

    hello = [{"role": "user", "content": "hi"}]
    poem_chunks = list(backend.sync.chat("poet", hello, ignore_eos=True))
    poem = poem_chunks[-1]
    plain = list(backend.sync.chat("clerk", hello, max_tokens=3, temperature=0.0, ignore_eos=True))[-1]
    assert poem.stats.completion_tokens == 3  # the alias's default max_tokens
    assert poem.stats.prompt_tokens > plain.stats.prompt_tokens  # its system prompt leads
    again = list(backend.sync.chat("poet", hello, ignore_eos=True))
    text = lambda chunks: "".join(c.text for c in chunks)  # noqa: E731
    assert again[0].cache == "hit" and text(again) == text(poem_chunks)  # aliases' answers are cached too


def test_restart_restores_and_warms_the_loaded_set(tmp_path: Path, config_file: Callable[..., Path]) -> None:
    state_file = tmp_path / "state" / "corral.json"
    source = config_source(config_file(extra=(
        "[[models]]\nname = 'first'\npath = '{0}/tiny-b.gguf'\npriority = 5\n"
        "[[models]]\nname = 'second'\npath = '{0}/tiny-c.gguf'\n").format(Path(config_file().parent) / "models")),
        env={})
    with LocalBackend(config=source, state_file=state_file) as backend:
        backend.sync.load("second")
        backend.sync.load("first")
        backend.sync.pin("tiny-a")
        wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["pinned"] == ["tiny-a"],
                   what="the state file")
    assert json.loads(state_file.read_text()) == {"loaded": ["first", "second"], "pinned": ["tiny-a"]}
    with LocalBackend(config=source, state_file=state_file) as backend:
        backend.sync.run(backend.warmed())
        infos = {m.name: m for m in backend.sync.models()}
        assert infos["first"].state == infos["second"].state == "ready" and infos["tiny-a"].pinned
        loads = [e for e in backend.bus.recent() if getattr(e, "new", None) == "loading"]
        assert [e.model for e in loads] == ["first", "second"]  # higher priority first


def test_a_corrupt_state_file_means_a_cold_start(tmp_path: Path, config_file: Callable[..., Path]) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text("{not json")
    with LocalBackend(config=config_source(config_file(), env={}), state_file=state_file) as backend:
        backend.sync.run(backend.warmed())
        assert all(m.state == "available" for m in backend.sync.models())


async def test_waiting_loads_go_by_priority() -> None:
    gate = PriorityGate()
    order: list[str] = []

    async def load(name: str, priority: int) -> None:
        async with gate.hold(name, priority):
            order.append(name)
            await asyncio.sleep(0.01)

    async with gate.hold("running", 0):
        tasks = [asyncio.create_task(load(n, p)) for n, p in [("low", -1), ("mid", 0), ("high", 9), ("mid2", 0)]]
        await asyncio.sleep(0.01)
        assert gate.waiting() == ["high", "mid", "mid2", "low"]
        tasks[1].cancel()  # a cancelled waiter leaves the line
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["high", "mid2", "low"]
    async with gate.hold("again", 0):  # the gate is free again
        pass


def test_a_new_model_dir_adds_its_models_and_a_dropped_one_removes_them(
        backend: LocalBackend, config_file: Callable[..., Path], tmp_path: Path, tiny_gguf: Callable[..., Path]) -> None:
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "tiny-d.gguf").write_bytes(tiny_gguf("tiny-d").read_bytes())
    text = config_file().read_text().replace("model_dirs = [", f"model_dirs = [{str(extra)!r}, ")
    backend._source.file.write_text(text)
    version = backend.sync.reload_config()
    assert any(line.startswith("model_dirs:") for line in version.diff)
    assert "tiny-d" in [m.name for m in backend.sync.models()]
    backend.sync.load("tiny-d")
    config_file()  # the extra folder is gone from the config again
    version = backend.sync.reload_config()
    assert "tiny-d: no longer configured; unloading once its requests finish" in version.actions
    wait_for(lambda: "tiny-d" not in [m.name for m in backend.sync.models()], what="tiny-d to go")
