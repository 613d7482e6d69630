"""Shared fixtures. Tiny GGUF models come from tests/ggufs.py (see its docstring)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ggufs import write_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def private_state_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The console and `corral serve` keep their warm-restart state in the user's state dir;
    the suite's runs (in-process and the commands it starts) keep theirs apart."""
    import os

    os.environ["CORRAL_STATE_FILE"] = str(tmp_path_factory.mktemp("state") / "state.json")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A factory `make(name, **kw) -> Path` for tiny llama GGUFs, one file per distinct args.

    Session-scoped and cached because every lifecycle test needs a model and writing one
    costs ~50 ms; tests must not modify the returned files (copy them first).
    """
    root = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def make(name: str, **kw: Any) -> Path:
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            path = root / f"{len(made):03d}" / f"{name}.gguf"
            made[key] = write_tiny_llama(path, name=name, **kw)
        return made[key]

    return make


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A fresh directory holding three tiny models: tiny-a, tiny-b and tiny-c."""
    directory = tmp_path / "models"
    for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        write_tiny_llama(directory / f"{name}.gguf", name=name, seed=seed)
    return directory
