"""Pulling through a real `corral serve` and the `corral` command: the admin API's pull stream,
cancel and rm, RemoteBackend over them, ollama's /api/pull and /api/delete through the official
`ollama` client, `corral pull` / `corral rm` (here and with --url, Ctrl+C), and a disk that
fills while writing (a small tmpfs in a user and mount namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from corral.backend.errors import Cancelled, NotPulled, PullNotFound
from corral.backend.memory import format_bytes
from corral.backend.remote import RemoteBackend
from fileserver import FileServer, Repo
from ggufs import write_tiny_llama
from support import Server, assert_error, clean_env, start_server, tiny_settings, wait_for, write_config
from test_pull import until_bytes

MODEL = "served-tiny"
REPO = "owner/served-GGUF"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """A module's file host and fake hub: `MODEL.gguf`, and the repository REPO with it as Q4_K_M."""
    host = FileServer()
    gguf = write_tiny_llama(tmp_path_factory.mktemp("source") / f"{MODEL}.gguf", name=MODEL).read_bytes()
    host.files.add(f"{MODEL}.gguf", gguf)
    host.files.repos[REPO] = Repo({"served-Q4_K_M.gguf": f"{MODEL}.gguf"})
    yield host
    host.close()


@pytest.fixture(scope="module")
def pull_server(tmp_path_factory: pytest.TempPathFactory, host: FileServer) -> Iterator[Server]:
    """`corral serve` on a folder with tiny-a, its hub at `host`, also on an ollama port."""
    root = tmp_path_factory.mktemp("pull-server")
    write_tiny_llama(root / "models" / "tiny-a.gguf", name="tiny-a")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", host.url)
        running = start_server(root, write_config(root / "corral.toml", tiny_settings(root / "models")),
                               extra=("--ollama-port", "0"))
    yield running
    assert running.stop() == 0, running.log()


def folder(server: Server) -> Path:
    return server.stdout.parent / "models"


def sse(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_the_admin_api_streams_a_pull_and_the_model_answers(pull_server: Server, host: FileServer) -> None:
    with pull_server.http() as http:
        with http.stream("POST", "/api/models/pull", json={"source": f"{host.url}/files/{MODEL}.gguf"}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = sse(response)
        assert {name for name, _ in events[:-1]} == {"progress"} and events[-1][0] == "done"
        assert events[0][1]["status"] == "resolving" and events[-1][1]["model"] == MODEL
        assert events[-1][1]["paths"] == [str(folder(pull_server) / f"{MODEL}.gguf")]
        answer = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 3})
        assert answer.status_code == 200, answer.text
        assert_error(http.post("/api/models/pull", json={"source": "llama3.2"}), 400, "pull_source_invalid",
                     "hf.co/owner/repo:QUANT")
        assert_error(http.post("/api/models/pull", json={"source": f"{host.url}/files/{MODEL}.gguf",
                                                         "dir": "/elsewhere"}), 400, "invalid_request", "model_dirs")
        assert_error(http.post("/api/models/pull", json={"src": "x"}), 400, "invalid_request", "source")
        with http.stream("POST", "/api/models/pull", json={"source": f"{host.url}/files/none.gguf"}) as response:
            name, body = sse(response)[-1]
        assert name == "error" and body["error"]["code"] == "pull_not_found"
        removed = http.delete(f"/api/models/{MODEL}")
        assert removed.json() == {"name": MODEL, "removed": [str(folder(pull_server) / f"{MODEL}.gguf")]}
        assert_error(http.delete("/api/models/tiny-a"), 409, "not_pulled", "corral did not download")
        assert_error(http.delete("/api/pulls/nope"), 404, "not_found", "no running pull")


async def test_remote_backend_pulls_cancels_resumes_and_removes(pull_server: Server, host: FileServer) -> None:
    source = f"{host.url}/held/{MODEL}.gguf"
    async with RemoteBackend(pull_server.url) as remote, RemoteBackend(pull_server.url) as console:
        stream = remote.pull(source, name="remote-copy")
        started = await until_bytes(stream)
        assert started.model == "remote-copy" and [p.id for p in await console.pulls()] == [started.id]
        await console.cancel_pull(started.id)  # another client cancels it
        with pytest.raises(Cancelled, match="resume"):
            async for _ in stream:  # the progress still on its way, then the end
                pass
        assert [p.name for p in folder(pull_server).iterdir() if p.name.endswith(".partial")]
        host.files.release.set()
        statuses = [s async for s in remote.pull(source, name="remote-copy")]
        assert statuses[-1].status == "done" and statuses[-1].resumed > 0
        assert "remote-copy" in [m.name for m in await console.models()]
        assert await console.remove("remote-copy") == [str(folder(pull_server) / "remote-copy.gguf")]
        with pytest.raises(NotPulled, match="a file in a model folder"):
            await console.remove("tiny-a")
        with pytest.raises(PullNotFound):
            async for _ in remote.pull(f"{host.url}/files/none.gguf"):
                pass
    assert not [p for p in folder(pull_server).iterdir() if p.name.endswith(".partial")]


def test_the_ollama_client_pulls_and_deletes(pull_server: Server, host: FileServer) -> None:
    client = pull_server.ollama()
    parts = list(client.pull(f"hf.co/{REPO}:Q4_K_M", stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-2:] == ["verifying sha256 digest", "success"]
    pulling = [p for p in parts if p.status and p.status.startswith("pulling ") and p.digest]
    size = len(host.files.data[f"{MODEL}.gguf"])
    assert pulling and pulling[-1].total == size and pulling[-1].digest.startswith("sha256:")
    assert pulling[-1].status == f"pulling {pulling[-1].digest[7:19]}"
    assert client.pull(f"hf.co/{REPO}:Q4_K_M").status == "success"  # already there: nothing downloaded
    assert "served-q4_k_m:latest" in [m.model for m in client.list().models]
    assert client.generate(model="served-q4_k_m", prompt="Once", raw=True, options={"num_predict": 2}).done
    pulled_as = f"hf.co/{REPO}:Q4_K_M"  # an ollama app goes on with the name it pulled by
    assert client.chat(model=pulled_as, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}).done
    assert client.generate(model=pulled_as, prompt="Once", raw=True, options={"num_predict": 2}).done
    assert client.show(pulled_as).modelfile is not None
    with pytest.raises(ollama.ResponseError) as library:
        client.pull("llama3.2")
    assert library.value.status_code == 400 and "hf.co/owner/repo:QUANT" in library.value.error
    assert client.delete("served-q4_k_m").status == "success"
    with pytest.raises(ollama.ResponseError) as refused:
        client.delete("tiny-a")
    assert refused.value.status_code == 409 and "corral did not download" in refused.value.error
    prefixed = pull_server.ollama(f"{pull_server.url}/ollama")  # corral's own port, under /ollama
    with pytest.raises(ollama.ResponseError, match="HTTP 404"):
        list(prefixed.pull(f"hf.co/{REPO}/missing.gguf", stream=True))


# -- the corral command --------------------------------------------------------------------------


def corral(*args: str, home: Path, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    env = clean_env(HOME=str(home), XDG_STATE_HOME=str(home / "state"), XDG_DATA_HOME=str(home / "data"))
    return subprocess.Popen([sys.executable, "-m", "corral.console.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture
def cli_config(tmp_path: Path) -> Path:
    write_tiny_llama(tmp_path / "models" / "tiny-a.gguf", name="tiny-a")
    return write_config(tmp_path / "corral.toml", tiny_settings(tmp_path / "models"))


def test_corral_pull_and_rm_here(tmp_path: Path, cli_config: Path, file_server: FileServer) -> None:
    gguf = write_tiny_llama(tmp_path / "src" / "cli.gguf", name="cli").read_bytes()
    digest = file_server.files.add("cli.gguf", gguf)
    code, out, err = finished(corral("--config", str(cli_config), "pull", f"{file_server.url}/files/cli.gguf",
                                     "--sha256", digest, home=tmp_path))
    assert code == 0, err
    assert out.strip() == f"pulled cli: {tmp_path / 'models' / 'cli.gguf'} ({format_bytes(len(gguf))})"
    lines = err.splitlines()  # not a terminal: a line per stage and per 10 %
    assert lines[0].startswith("resolving ") and lines[1].startswith(f"pulling {file_server.url}/files/cli.gguf as cli")
    assert any(line.startswith("100%") for line in lines) and "\r" not in err
    assert json.loads((tmp_path / "state" / "corral" / "pulled.json").read_text())["models"][0]["sha256"] == [digest]
    code, out, _ = finished(corral("--config", str(cli_config), "models", "--json", home=tmp_path))
    assert sorted(m["name"] for m in json.loads(out)) == ["cli", "tiny-a"]
    code, out, err = finished(corral("--config", str(cli_config), "rm", "tiny-a", home=tmp_path))
    assert code == 1 and "corral did not download" in err and (tmp_path / "models" / "tiny-a.gguf").exists()
    code, out, err = finished(corral("--config", str(cli_config), "rm", "cli", home=tmp_path))
    assert code == 0 and out.strip() == f"removed cli: {tmp_path / 'models' / 'cli.gguf'}", err


def test_corral_pull_with_url_uses_the_server(tmp_path: Path, pull_server: Server, host: FileServer) -> None:
    code, out, err = finished(corral("pull", f"hf://{REPO}/served-Q4_K_M.gguf", "--name", "via-url", "--url",
                                     pull_server.url, home=tmp_path))
    assert code == 0 and out.startswith(f"pulled via-url: {folder(pull_server) / 'via-url.gguf'}"), err
    code, out, err = finished(corral("rm", "via-url", "--url", pull_server.url, home=tmp_path))
    assert code == 0 and not (folder(pull_server) / "via-url.gguf").exists(), err


def test_ctrl_c_cancels_and_the_same_command_resumes(tmp_path: Path, cli_config: Path, file_server: FileServer) -> None:
    gguf = write_tiny_llama(tmp_path / "src" / "held.gguf", name="held").read_bytes()
    file_server.files.add("held.gguf", gguf)
    args = ("--config", str(cli_config), "pull", f"{file_server.url}/held/held.gguf")
    errors = tmp_path / "stderr.txt"
    models = tmp_path / "models"

    def held_half() -> bool:  # the host sent half and waits; the pull wrote all of it
        return any(p.name.endswith(".partial") and p.stat().st_size == len(gguf) // 2 for p in models.iterdir())

    with errors.open("w") as err_file:
        proc = corral(*args, home=tmp_path, stderr=err_file)
        wait_for(held_half, timeout=60, what="the pull to write the half the host sent")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "cancelled" in errors.read_text() and "resume" in errors.read_text()
    partial = [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and partial[0].stat().st_size == len(gguf) // 2
    file_server.files.release.set()
    code, out, err = finished(corral(*args, home=tmp_path))
    assert code == 0 and "resuming at" in err and (tmp_path / "models" / "held.gguf").read_bytes() == gguf


def test_a_disk_that_fills_while_writing_keeps_the_catalog_unchanged(tmp_path: Path, file_server: FileServer) -> None:
    """A tmpfs smaller than the model, in a user and mount namespace; the host does not say the
    size, so only the writing can find out."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    gguf = write_tiny_llama(tmp_path / "src" / "big.gguf", name="big", n_embd=128, n_ff=256).read_bytes()
    file_server.files.add("big.gguf", gguf)
    small = tmp_path / "small"
    small.mkdir()
    config = write_config(tmp_path / "corral.toml", tiny_settings(small))
    size_kib = len(gguf) // 1024 // 2
    cli = f"{sys.executable} -m corral.console.cli --config {config}"
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {small} && "
              f"{cli} pull {file_server.url}/nolength/big.gguf 2> {tmp_path / 'err.txt'}; echo $? > {tmp_path / 'rc'}; "
              f"ls -a {small} > {tmp_path / 'ls.txt'}; {cli} models --json > {tmp_path / 'models.json'}")
    env = clean_env(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"))
    done = subprocess.run([unshare, "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    error = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", error
    assert "the disk filled while writing big.gguf" in error and f"free in {small}" in error and "resume" in error
    [left] = [n for n in (tmp_path / "ls.txt").read_text().split() if n not in (".", "..")]
    assert left.startswith(".big.gguf.") and left.endswith(".partial")
    assert json.loads((tmp_path / "models.json").read_text()) == []
    assert os.listdir(small) == []  # the tmpfs went with its namespace
