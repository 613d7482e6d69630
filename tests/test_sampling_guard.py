"""The loop guard (a repetition penalty and llama.cpp's DRY sampler) and the DRY options:
the API samples with the guard only where a request leaves them unset and the config says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backend.config import Settings, settings_from_dict
from corral.backend.errors import BadRequest
from corral.backend.generation import LOOP_GUARD
from corral.backend.local import LocalBackend
from support import Server, tiny_settings

PROMPT = "one two three one two three one two three"


@pytest.fixture(scope="module")
def backends(tiny_models: Path) -> Iterator[tuple[LocalBackend, LocalBackend]]:
    """The same tiny model without and with `[sampling] loop_guard`."""
    plain = settings_from_dict(tiny_settings(tiny_models, cache={"enabled": False}))
    guarded = settings_from_dict(tiny_settings(tiny_models, cache={"enabled": False}, sampling={"loop_guard": True}))
    with LocalBackend(plain) as off, LocalBackend(guarded) as on:
        yield off, on


def text(backend: LocalBackend, **options: object) -> str:
    return backend.sync.text("tiny-a", PROMPT, max_tokens=48, temperature=0, ignore_eos=True, **options)


def test_the_guard_is_off_unless_the_config_turns_it_on() -> None:
    assert Settings().sampling.loop_guard is False


def test_requests_that_set_nothing_get_the_guard_only_where_it_is_on(backends: tuple[LocalBackend, LocalBackend]) -> None:
    off, on = backends
    plain, guarded = text(off), text(off, **LOOP_GUARD)
    assert plain != guarded  # the penalties change greedy output (random weights repeat a lot)
    assert text(on) == guarded
    assert text(on, repeat_penalty=1.0, dry_multiplier=0.0) == plain  # a request's own values win


def test_each_penalty_works_on_its_own(backends: tuple[LocalBackend, LocalBackend]) -> None:
    off, _ = backends
    plain = text(off)
    assert text(off, repeat_penalty=1.3) != plain
    assert text(off, dry_multiplier=2.0, dry_allowed_length=1) != plain


@pytest.mark.parametrize(("options", "says"), [
    ({"dry_multiplier": -1}, "dry_multiplier = -1.0: must be between 0 (off) and 10"),
    ({"dry_base": 0.5}, "dry_base = 0.5: must be between 1 and 10"),
    ({"dry_allowed_length": 0}, "dry_allowed_length = 0: must be between 1 and 1024"),
    ({"dry_penalty_last_n": 1.5}, "dry_penalty_last_n = 1.5: must be an integer"),
])
def test_bad_dry_options_are_refused_naming_them(backends: tuple[LocalBackend, LocalBackend],
                                                 options: dict[str, object], says: str) -> None:
    off, _ = backends
    with pytest.raises(BadRequest, match=says.replace("(", r"\(").replace(")", r"\)")):
        text(off, **options)


def test_the_openai_dialect_takes_the_dry_options(tiny_server: Server) -> None:
    body = {"model": "tiny-a", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "dry_multiplier": 0.8,
            "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 128}
    with tiny_server.http() as http:
        ok = http.post("/v1/completions", json=body)
        bad = http.post("/v1/completions", json={**body, "dry_base": 0})
    assert ok.status_code == 200, ok.text
    assert bad.status_code == 400 and "dry_base" in bad.text
