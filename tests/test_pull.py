"""Pulling models in-process (LocalBackend) from a real HTTP server on 127.0.0.1 (tests/fileserver.py):
resume after a cut, hosts without Range, sha256 from the hub and from the caller, the GGUF magic,
404/401, an unreachable host, disk space, name clashes, single flight, cancel, split models,
the pull folder, events, and `remove` of pulled models only.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.backend.config import settings_from_dict
from corral.backend.errors import (BadRequest, Cancelled, CorralError, InsufficientDisk, ModelNameTaken, ModelNotFound,
                                   NotPulled, PullError, PullForbidden, PullNotFound, PullSourceInvalid)
from corral.backend.local import LocalBackend
from corral.backend.pull.status import PullStatus
from fileserver import FileServer, Repo
from ggufs import write_tiny_llama
from support import free_port, tiny_settings

MODEL = "pulled-tiny"


@pytest.fixture(autouse=True)
def no_real_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach huggingface.co: a test that needs a hub points HF_ENDPOINT at its own."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A tiny model's bytes (about 400 KB): what the server hands out."""
    return write_tiny_llama(tmp_path_factory.mktemp("source") / f"{MODEL}.gguf", name=MODEL).read_bytes()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    write_tiny_llama(folder / "tiny-a.gguf", name="tiny-a")
    return folder


@pytest.fixture
def backend(models: Path, tmp_path: Path) -> Iterator[LocalBackend]:
    with LocalBackend(settings_from_dict(tiny_settings(models)), pulled_file=tmp_path / "pulled.json") as local:
        yield local


def served(file_server: FileServer, gguf: bytes, name: str = f"{MODEL}.gguf") -> str:
    """Register `gguf` under `name`; its sha256."""
    return file_server.files.add(name, gguf)


def pull(backend: LocalBackend, source: str, **options: Any) -> list[PullStatus]:
    return list(backend.sync.pull(source, **options))


def names(backend: LocalBackend) -> list[str]:
    return [m.name for m in backend.sync.models()]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


def answers(backend: LocalBackend, name: str) -> bool:
    return bool(backend.sync.text(name, "Once upon a time", max_tokens=4, temperature=0, ignore_eos=True))


# -- a whole pull ----------------------------------------------------------------------------------


def test_a_url_pull_lands_in_the_first_model_folder_and_answers(backend: LocalBackend, models: Path,
                                                                 file_server: FileServer, gguf: bytes) -> None:
    digest = served(file_server, gguf)
    statuses = pull(backend, f"{file_server.url}/files/{MODEL}.gguf", sha256=digest)
    last = statuses[-1]
    assert [s.status for s in statuses][0] == "resolving" and last.status == "done"
    assert "downloading" in {s.status for s in statuses} and "verifying" in {s.status for s in statuses}
    assert last.model == MODEL and last.completed == last.total == len(gguf) and not last.already
    assert last.paths == (str(models / f"{MODEL}.gguf"),) and last.directory == str(models)
    assert (models / f"{MODEL}.gguf").read_bytes() == gguf and not partials(models)
    assert MODEL in names(backend) and answers(backend, MODEL)


def test_an_interrupted_pull_resumes_where_it_stopped(backend: LocalBackend, models: Path, file_server: FileServer,
                                                      gguf: bytes) -> None:
    """The acceptance: cut at about half, the same pull again continues with Range and the
    sha256 the hub publishes holds; the model then answers."""
    files = file_server.files
    digest = served(file_server, gguf)
    files.repos["owner/tiny-GGUF"] = Repo({f"{MODEL}-Q4_K_M.gguf": f"{MODEL}.gguf"})
    half = len(gguf) // 2
    files.cuts[f"{MODEL}.gguf"], files.cut_at[f"{MODEL}.gguf"] = 1, half
    source = f"{file_server.url}/files/{MODEL}.gguf"
    with pytest.raises(PullError) as cut:
        pull(backend, source)
    assert "run the same pull again to resume" in cut.value.message and f"stopped at {half}" in cut.value.message
    [partial] = partials(models)
    assert partial.stat().st_size == half and partial.name.startswith(".")
    assert MODEL not in names(backend)  # nothing half-written is listed

    statuses = pull(backend, source, sha256=digest)
    assert statuses[-1].status == "done" and statuses[-1].resumed == half
    assert files.gets(f"{MODEL}.gguf")[-1].range == f"bytes={half}-"
    assert hashlib.sha256((models / f"{MODEL}.gguf").read_bytes()).hexdigest() == digest
    assert not partials(models) and answers(backend, MODEL)


def test_a_hub_pull_resumes_and_checks_the_hubs_sha256(backend: LocalBackend, models: Path, file_server: FileServer,
                                                       gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", file_server.url)
    files = file_server.files
    digest = served(file_server, gguf, "blob-q4.gguf")
    files.repos["owner/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": "blob-q4.gguf", "tiny-Q4_K_M.gguf": "blob-q4.gguf"})
    half = len(gguf) // 2
    files.cuts["blob-q4.gguf"], files.cut_at["blob-q4.gguf"] = 1, half
    with pytest.raises(PullError, match="resume"):
        pull(backend, "hf://owner/tiny-GGUF:Q4_K_M")
    statuses = pull(backend, "hf://owner/tiny-GGUF:q4_k_m")
    assert statuses[-1].model == "tiny-q4_k_m" and statuses[-1].resumed == half
    assert {s.sha256 for s in statuses if s.status == "downloading"} == {digest}  # from the file list
    assert (models / "tiny-Q4_K_M.gguf").read_bytes() == gguf and answers(backend, "tiny-q4_k_m")


def test_a_host_that_ignores_range_starts_over_cleanly(backend: LocalBackend, models: Path, file_server: FileServer,
                                                      gguf: bytes) -> None:
    digest = served(file_server, gguf)
    files = file_server.files
    files.cuts[f"{MODEL}.gguf"], files.cut_at[f"{MODEL}.gguf"] = 1, len(gguf) // 3
    source = f"{file_server.url}/files/{MODEL}.gguf"
    with pytest.raises(PullError, match="resume"):
        pull(backend, source)
    files.ignore_range.add(f"{MODEL}.gguf")
    statuses = pull(backend, source, sha256=digest)
    assert files.gets(f"{MODEL}.gguf")[-1].range == f"bytes={len(gguf) // 3}-"  # asked; answered 200 with it all
    assert statuses[-1].status == "done" and statuses[-1].completed == len(gguf)
    assert (models / f"{MODEL}.gguf").read_bytes() == gguf and not partials(models)


# -- what is refused, and what it leaves behind ------------------------------------------------


def test_a_wrong_sha256_keeps_nothing(backend: LocalBackend, models: Path, file_server: FileServer,
                                      gguf: bytes) -> None:
    served(file_server, gguf)
    before = names(backend)
    with pytest.raises(PullError) as wrong:
        pull(backend, f"{file_server.url}/files/{MODEL}.gguf", sha256="0" * 64)
    assert "sha256 mismatch" in wrong.value.message and "not kept" in wrong.value.message
    assert listing(models) == ["tiny-a.gguf"] and names(backend) == before


def test_a_wrong_hub_sha256_keeps_nothing(backend: LocalBackend, models: Path, file_server: FileServer,
                                          gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's hash says one thing, the bytes another (a corrupt mirror)."""
    monkeypatch.setenv("HF_ENDPOINT", file_server.url)
    served(file_server, gguf)
    file_server.files.repos["owner/r"] = Repo({"m.gguf": f"{MODEL}.gguf"})
    file_server.files.published[f"{MODEL}.gguf"] = hashlib.sha256(b"another upload").hexdigest()
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(backend, "hf://owner/r/m.gguf")
    assert listing(models) == ["tiny-a.gguf"] and names(backend) == ["tiny-a"]


@pytest.mark.parametrize("mode", ["html", "mislabelled"])
def test_an_html_page_stops_at_once_and_keeps_nothing(backend: LocalBackend, models: Path, file_server: FileServer,
                                                      mode: str) -> None:
    with pytest.raises(PullError) as page:
        pull(backend, f"{file_server.url}/{mode}/model.gguf")
    assert ("HTML page" if mode == "html" else "not a GGUF file") in page.value.message
    assert listing(models) == ["tiny-a.gguf"] and names(backend) == ["tiny-a"]


@pytest.mark.parametrize("source, error, mentions", [
    ("{url}/files/missing.gguf", PullNotFound, "HTTP 404"),
    ("{url}/auth/{model}.gguf", PullForbidden, "HTTP 401"),
    ("http://127.0.0.1:{closed}/files/x.gguf", PullError, "cannot reach the host"),
    ("llama3.2", PullSourceInvalid, "hf.co/owner/repo:QUANT"),
    ("llama3.2:3b", PullSourceInvalid, "ollama's library"),
    ("https://example.invalid/model.bin", PullSourceInvalid, "does not name a .gguf file"),
    ("hf://just-an-owner", PullSourceInvalid, "owner/name"),
    ("hf://owner/repo:Q4_Q", PullSourceInvalid, "not a quantization"),
])
def test_bad_sources_are_clear_errors(backend: LocalBackend, models: Path, file_server: FileServer, gguf: bytes,
                                      source: str, error: type[Exception], mentions: str) -> None:
    served(file_server, gguf)
    with pytest.raises(error) as raised:
        pull(backend, source.format(url=file_server.url, model=MODEL, closed=free_port()))
    assert mentions in raised.value.message  # type: ignore[attr-defined]
    assert listing(models) == ["tiny-a.gguf"]


def test_a_gated_repository_says_to_set_hf_token(backend: LocalBackend, models: Path, file_server: FileServer,
                                                 gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", file_server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    served(file_server, gguf)
    file_server.files.repos["meta/gated-GGUF"] = Repo({"gated-Q4_K_M.gguf": f"{MODEL}.gguf"}, gated=True)
    for source in ("hf://meta/gated-GGUF:Q4_K_M", "hf://meta/gated-GGUF/gated-Q4_K_M.gguf"):
        with pytest.raises(PullForbidden) as refused:
            pull(backend, source)
        assert "HF_TOKEN" in refused.value.message and "licence" in refused.value.message
    monkeypatch.setenv("HF_TOKEN", file_server.files.token)
    assert pull(backend, "hf.co/meta/gated-GGUF:Q4_K_M")[-1].model == "gated-q4_k_m"
    sent = {r.authorization for r in file_server.files.requests if r.path.startswith(("/api/", "/meta/"))}
    assert sent == {None, f"Bearer {file_server.files.token}"}


def test_quantizations_missing_or_ambiguous_list_what_exists(backend: LocalBackend, file_server: FileServer,
                                                             gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", file_server.url)
    served(file_server, gguf)
    file_server.files.repos["owner/many-GGUF"] = Repo({
        "m-Q8_0.gguf": f"{MODEL}.gguf", "m-IQ4_XS.gguf": f"{MODEL}.gguf", "big/m-Q4_0-00001-of-00002.gguf": f"{MODEL}.gguf",
        "big/m-Q4_0-00002-of-00002.gguf": f"{MODEL}.gguf", "other-Q8_0.gguf": f"{MODEL}.gguf",
        "mmproj-m-F16.gguf": f"{MODEL}.gguf"})
    with pytest.raises(PullNotFound) as missing:
        pull(backend, "hf://owner/many-GGUF:Q4_K_M")
    assert "has no Q4_K_M file; it has IQ4_XS, Q4_0, Q8_0" in missing.value.message
    with pytest.raises(PullNotFound, match="has no Q4_K_M"):  # no tag: Q4_K_M, as ollama takes it
        pull(backend, "hf.co/owner/many-GGUF")
    with pytest.raises(PullSourceInvalid) as ambiguous:
        pull(backend, "hf://owner/many-GGUF:Q8_0")
    assert "m-Q8_0.gguf" in ambiguous.value.message and "other-Q8_0.gguf" in ambiguous.value.message
    with pytest.raises(PullNotFound, match="no repository owner/nothing"):
        pull(backend, "hf://owner/nothing:Q4_K_M")
    with pytest.raises(PullNotFound, match="F16"):  # the vision projector is not a model
        pull(backend, "hf://owner/many-GGUF:F16")


def test_a_declared_size_beyond_the_free_space_is_refused_with_the_numbers(
        backend: LocalBackend, models: Path, file_server: FileServer, gguf: bytes) -> None:
    served(file_server, gguf)
    with pytest.raises(InsufficientDisk) as full:
        pull(backend, f"{file_server.url}/huge/{MODEL}.gguf")
    assert full.value.needed == 10**15 and 0 <= full.value.free < 10**15 and full.value.path == str(models)
    assert f"{10**15} bytes) needed" in full.value.message and str(models) in full.value.message
    assert not file_server.files.gets(f"{MODEL}.gguf")  # refused before the first byte
    assert listing(models) == ["tiny-a.gguf"] and names(backend) == ["tiny-a"]


def test_a_name_clash_is_refused_and_name_picks_another(backend: LocalBackend, models: Path, file_server: FileServer,
                                                        gguf: bytes) -> None:
    served(file_server, gguf, "tiny-a.gguf")
    source = f"{file_server.url}/files/tiny-a.gguf"
    with pytest.raises(ModelNameTaken) as clash:
        pull(backend, source)
    assert "--name" in clash.value.message and str(models / "tiny-a.gguf") in clash.value.message
    assert not file_server.files.gets("tiny-a.gguf")
    last = pull(backend, source, name="Second-A")[-1]
    assert last.model == "second-a" and last.paths == (str(models / "Second-A.gguf"),)
    assert names(backend) == ["second-a", "tiny-a"]
    with pytest.raises(PullSourceInvalid, match="--name"):
        pull(backend, source, name="../escape")


def test_the_same_pull_again_downloads_nothing(backend: LocalBackend, file_server: FileServer, gguf: bytes) -> None:
    served(file_server, gguf)
    source = f"{file_server.url}/files/{MODEL}.gguf"
    first = pull(backend, source)[-1]
    again = pull(backend, source)[-1]
    assert again.already and again.paths == first.paths and len(file_server.files.gets(f"{MODEL}.gguf")) == 1


def test_a_folder_the_catalog_does_not_scan_is_refused(backend: LocalBackend, models: Path, tmp_path: Path,
                                                       file_server: FileServer, gguf: bytes) -> None:
    served(file_server, gguf)
    source = f"{file_server.url}/files/{MODEL}.gguf"
    with pytest.raises(BadRequest, match="model_dirs"):
        pull(backend, source, directory=str(tmp_path / "elsewhere"))
    last = pull(backend, source, directory=str(models / "family"))  # a subfolder of a model folder is scanned
    assert last[-1].paths == (str(models / "family" / f"{MODEL}.gguf"),) and MODEL in names(backend)


def test_without_model_folders_pulls_go_to_the_pull_folder(tmp_path: Path, file_server: FileServer, gguf: bytes,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    served(file_server, gguf)
    settings = settings_from_dict({"include_default_model": False, "defaults": {"n_ctx": 256, "n_threads": 1}})
    with LocalBackend(settings) as local:
        assert names(local) == []
        last = pull(local, f"{file_server.url}/files/{MODEL}.gguf")[-1]
        assert last.paths == (str(tmp_path / "data" / "corral" / "models" / f"{MODEL}.gguf"),)
        assert names(local) == [MODEL]
    with LocalBackend(settings) as again:  # scanned at every start, configured or not
        assert names(again) == [MODEL]


# -- several pulls, cancelling, events ------------------------------------------------------------


async def until_bytes(statuses: AsyncIterator[PullStatus]) -> PullStatus:
    """Read a pull's statuses until bytes have arrived (the held host then waits for the test)."""
    async for status in statuses:
        if status.completed > 0:
            return status
    raise AssertionError("the pull ended before any byte arrived")


async def test_concurrent_pulls_of_a_source_share_one_download(backend: LocalBackend, models: Path,
                                                              file_server: FileServer, gguf: bytes) -> None:
    served(file_server, gguf)
    source = f"{file_server.url}/held/{MODEL}.gguf"
    first, second = backend.pull(source), backend.pull(source)
    started = await until_bytes(first)
    joined = await anext(second)
    assert joined.id == started.id and joined.completed >= started.completed  # the same pull, not a new one
    assert [p.id for p in await backend.pulls()] == [started.id]
    file_server.files.release.set()
    ends = [[s async for s in first][-1], [s async for s in second][-1]]
    assert [e.status for e in ends] == ["done", "done"] and ends[0] == ends[1]
    assert len(file_server.files.gets(f"{MODEL}.gguf")) == 1 and MODEL in names(backend)
    assert await backend.pulls() == []


async def test_cancel_leaves_only_the_resumable_partial(backend: LocalBackend, models: Path, file_server: FileServer,
                                                        gguf: bytes) -> None:
    served(file_server, gguf)
    source = f"{file_server.url}/held/{MODEL}.gguf"
    events = backend.events()
    stream = backend.pull(source)
    started = await until_bytes(stream)
    stopped = await backend.cancel_pull(started.id)
    assert stopped.id == started.id and stopped.status == "downloading"
    with pytest.raises(Cancelled) as cancelled:
        await anext(stream)
    [partial] = partials(models)
    assert str(partial) in cancelled.value.message and "resume" in cancelled.value.message
    kept = partial.stat().st_size
    assert 0 < stopped.completed <= kept <= len(gguf) // 2 and listing(models) == sorted(["tiny-a.gguf", partial.name])
    assert names(backend) == ["tiny-a"] and await backend.pulls() == []
    failed = await anext(e async for e in events if e.type == "pull_failed")
    assert failed.cancelled and failed.partial == str(partial) and failed.pull_id == started.id
    with pytest.raises(CorralError, match="no running pull"):
        await backend.cancel_pull(started.id)
    file_server.files.release.set()
    again = [s async for s in backend.pull(source)]
    assert again[-1].resumed == kept and (models / f"{MODEL}.gguf").read_bytes() == gguf


async def test_the_last_follower_leaving_cancels_the_pull(backend: LocalBackend, models: Path,
                                                          file_server: FileServer, gguf: bytes) -> None:
    served(file_server, gguf)
    events = backend.events()
    stream = backend.pull(f"{file_server.url}/held/{MODEL}.gguf")
    await until_bytes(stream)
    await stream.aclose()  # what Ctrl+C or a closed connection does
    failed = await anext(e async for e in events if e.type == "pull_failed")
    assert failed.cancelled and [p.name for p in partials(models)] == [Path(failed.partial).name]
    assert names(backend) == ["tiny-a"]


async def test_progress_events_in_one_percent_steps_and_the_finish_names_the_model(
        backend: LocalBackend, file_server: FileServer, gguf: bytes) -> None:
    digest = served(file_server, gguf)
    events = backend.events()
    statuses = [s async for s in backend.pull(f"{file_server.url}/files/{MODEL}.gguf")]
    percents = []
    async for event in events:
        if event.type == "pull_progress":
            assert event.pull_id == statuses[0].id and event.model == MODEL and event.total == len(gguf)
            percents.append(event.percent)
        elif event.type == "pull_finished":
            finished = event
            break
    assert percents == sorted(set(percents)) and percents[-1] == 100 and all(0 <= p <= 100 for p in percents)
    assert finished.model == MODEL and finished.sha256 == (digest,) and finished.size == len(gguf)
    assert finished.files == statuses[-1].paths and not finished.already


def test_a_split_model_comes_as_its_whole_set(backend: LocalBackend, models: Path, file_server: FileServer,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", file_server.url)
    write_tiny_llama(tmp_path / "split" / "split-Q8_0.gguf", name="split", split_max_tensors=12)
    shards = sorted((tmp_path / "split").iterdir())
    assert len(shards) >= 2 and shards[0].name == f"split-Q8_0-00001-of-{len(shards):05d}.gguf"
    repo = {}
    for shard in shards:
        file_server.files.add(shard.name, shard.read_bytes())
        repo[f"Q8_0/{shard.name}"] = shard.name
    file_server.files.repos["owner/split-GGUF"] = Repo(repo)
    # the second shard named: the whole set comes, under the first shard's name
    last = pull(backend, f"hf://owner/split-GGUF/Q8_0/{shards[1].name}")[-1]
    assert last.model == "split-q8_0" and last.files == len(shards)
    assert listing(models) == sorted(["tiny-a.gguf", *(s.name for s in shards)])
    assert names(backend) == ["split-q8_0", "tiny-a"] and answers(backend, "split-q8_0")
    assert backend.sync.remove("split-q8_0") == [str(models / s.name) for s in shards]
    assert listing(models) == ["tiny-a.gguf"] and names(backend) == ["tiny-a"]
    with pytest.raises(PullSourceInvalid, match="--sha256 checks one file"):
        pull(backend, "hf://owner/split-GGUF:Q8_0", sha256="0" * 64)


# -- rm --------------------------------------------------------------------------------------------


def test_remove_deletes_only_what_corral_pulled(backend: LocalBackend, models: Path, tmp_path: Path,
                                                file_server: FileServer, gguf: bytes) -> None:
    served(file_server, gguf)
    pull(backend, f"{file_server.url}/files/{MODEL}.gguf")
    assert answers(backend, MODEL)  # loaded: rm unloads it first
    assert backend.sync.remove(MODEL) == [str(models / f"{MODEL}.gguf")]
    assert listing(models) == ["tiny-a.gguf"] and names(backend) == ["tiny-a"]
    [removed] = [e for e in backend.bus.recent() if e.type == "removed"]
    assert removed.model == MODEL and removed.files == (str(models / f"{MODEL}.gguf"),)
    with pytest.raises(NotPulled) as refused:
        backend.sync.remove("tiny-a")
    assert "a file in a model folder" in refused.value.message and str(models / "tiny-a.gguf") in refused.value.message
    assert (models / "tiny-a.gguf").exists()
    with pytest.raises(ModelNotFound):
        backend.sync.remove(MODEL)


def test_the_record_of_pulls_outlives_the_backend(models: Path, tmp_path: Path, file_server: FileServer,
                                                  gguf: bytes) -> None:
    served(file_server, gguf)
    settings = settings_from_dict(tiny_settings(models))
    with LocalBackend(settings, pulled_file=tmp_path / "pulled.json") as first:
        pull(first, f"{file_server.url}/files/{MODEL}.gguf")
    with LocalBackend(settings, pulled_file=tmp_path / "other.json") as stranger:
        with pytest.raises(NotPulled):  # another record: not its to delete
            stranger.sync.remove(MODEL)
    with LocalBackend(settings, pulled_file=tmp_path / "pulled.json") as second:
        assert second.sync.remove(MODEL) == [str(models / f"{MODEL}.gguf")]
