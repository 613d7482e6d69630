"""The notebook face: examples/notebook.ipynb executed in a real Jupyter kernel (nbclient +
ipykernel from this venv) against tiny GGUFs, in-process and against a `corral serve`; and
`connect()` with RemoteBackend's blocking twins called from inside a running loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from corral.backend import LocalBackend, RemoteBackend, connect
from support import TINY, Server, clean_env, tiny_settings, write_config

NAMES = list(TINY)  # conftest's `tiny_models`, which `tiny_server` serves
NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"
TABLE = '<table class="corral">'


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernel spec that starts ipykernel with this venv's Python, so the kernel imports the
    corral under test whatever kernels the machine has installed."""
    root = tmp_path_factory.mktemp("kernels")
    (root / "corral-test").mkdir()
    (root / "corral-test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "corral tests", "language": "python"}))
    return KernelSpecManager(kernel_dirs=[str(root)], ensure_native_kernel=False)


def execute(kernels: KernelSpecManager, cwd: Path, **env: str) -> nbformat.NotebookNode:
    """Run every cell of the example in a fresh kernel; a failing cell raises here."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manager = KernelManager(kernel_name="corral-test", kernel_spec_manager=kernels)
    client = NotebookClient(notebook, km=manager, timeout=120, startup_timeout=120,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=clean_env(XDG_CONFIG_HOME=str(cwd / "xdg"), **env))
    return notebook


def outputs(notebook: nbformat.NotebookNode, source: str) -> list[dict[str, Any]]:
    """The outputs of the one code cell whose source contains `source`."""
    [cell] = [c for c in notebook.cells if c.cell_type == "code" and source in c.source]
    return list(cell.outputs)


def html(notebook: nbformat.NotebookNode, source: str) -> str:
    return "".join(o["data"].get("text/html", "") for o in outputs(notebook, source) if "data" in o)


def printed(notebook: nbformat.NotebookNode, source: str) -> str:
    return "".join(o["text"] for o in outputs(notebook, source) if o["output_type"] == "stream"
                   and o["name"] == "stdout")


def check_example_outputs(notebook: nbformat.NotebookNode) -> None:
    assert not [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                if o["output_type"] == "error"]
    models = html(notebook, "ModelTable(")
    assert models.startswith(TABLE) and all(f"<td>{name}</td>" in models for name in NAMES)
    assert "<caption>tiny-a</caption>" in html(notebook, "backend.load(MODEL)")
    assert "<td>ready</td>" in html(notebook, "backend.load(MODEL)")
    streamed = printed(notebook, "aprint_stream(backend.complete")
    assert streamed.strip(), "the completion printed nothing"
    pieces = [o for o in outputs(notebook, "aprint_stream(backend.complete") if o["output_type"] == "stream"]
    assert len(pieces) > 2, "the tokens came out in one piece, not as they arrived"
    stats = outputs(notebook, "aprint_stream(backend.complete")[-1]["data"]["text/plain"]
    assert stats.startswith("RequestStats(prompt_tokens=")
    assert printed(notebook, "print_stream(backend.sync.chat").strip()
    status = html(notebook, "backend.sync.status()")
    assert "<caption>host</caption>" in status and "<caption>models</caption>" in status
    events = html(notebook, "recent_events(backend)")
    assert "<caption>events</caption>" in events and "<td>request_finished</td>" in events
    assert "<td>available</td>" in html(notebook, "backend.evict(MODEL)")


@pytest.mark.timeout(300)
def test_the_example_notebook_runs_in_a_kernel_on_an_embedded_backend(
        kernels: KernelSpecManager, tiny_models: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "corral.toml", tiny_settings(tiny_models))
    notebook = execute(kernels, tmp_path, CORRAL_CONFIG=str(config), CORRAL_MODEL="tiny-a")
    check_example_outputs(notebook)
    assert outputs(notebook, "backend.label")[0]["data"]["text/plain"] == "'embedded'"


@pytest.mark.timeout(300)
def test_the_example_notebook_runs_in_a_kernel_against_a_server(
        kernels: KernelSpecManager, tiny_server: Server, tmp_path: Path) -> None:
    notebook = execute(kernels, tmp_path, CORRAL_URL=tiny_server.url, CORRAL_MODEL="tiny-a")
    check_example_outputs(notebook)
    assert outputs(notebook, "backend.label")[0]["data"]["text/plain"] == repr(tiny_server.url)


async def test_remote_blocking_twins_work_inside_a_running_loop(tiny_server: Server) -> None:
    """What a notebook cell does with `backend.sync`: block while the kernel's loop runs."""
    remote = connect(tiny_server.url)
    assert isinstance(remote, RemoteBackend)
    assert [m.name for m in remote.sync.models()] == NAMES
    assert remote.sync.load("tiny-b").state == "ready"
    text = remote.sync.text("tiny-b", "the time", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert text and text == "".join([c.text async for c in remote.complete(
        "tiny-b", "the time", max_tokens=5, temperature=0.0, ignore_eos=True, cache=False)])
    assert {m.name: m.state for m in remote.sync.status().models}["tiny-b"] == "ready"
    assert (await remote.evict("tiny-b")).state == "available"
    runner = remote._runner
    assert runner is not None and runner.thread.is_alive()
    await remote.aclose()
    assert not runner.thread.is_alive()  # the twins' loop stops with the connections


def test_remote_blocking_twins_from_plain_code(tiny_server: Server) -> None:
    with connect(tiny_server.url) as remote:
        assert [m.name for m in remote.sync.models()] == NAMES
        runner = remote._runner
    assert runner is not None and not runner.thread.is_alive()
    remote.close()  # idempotent


def test_connect_without_a_url_runs_models_in_process(tiny_models: Path, tmp_path: Path) -> None:
    with connect(config=str(write_config(tmp_path / "corral.toml", tiny_settings(tiny_models)))) as local:
        assert isinstance(local, LocalBackend)
        assert [m.name for m in local.sync.models()] == NAMES


def test_connect_to_a_server_loads_neither_llama_cpp_nor_textual(tmp_path: Path) -> None:
    code = ("import sys\n"
            "from corral.backend import connect, ModelTable, EventLog, print_stream\n"
            "remote = connect('http://127.0.0.1:9')\n"
            "print(type(remote).__name__, remote._headers)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'textual')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=clean_env(CORRAL_API_KEY="notebook-key"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["RemoteBackend {'Authorization': 'Bearer notebook-key'}", "[]"]
