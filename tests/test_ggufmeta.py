"""The GGUF header reader: fields, sizes, every kind of bad file, caching, the real model."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from ggufs import (
    write_bad_magic,
    write_corrupt_header,
    write_tiny_llama,
    write_truncated,
    write_unknown_arch,
)

from corral.backend import ggufmeta
from corral.backend.errors import ModelFileError
from corral.backend.ggufmeta import GGUFInfo, read_gguf


def _reference(path: Path) -> tuple[int, int]:
    """Parameter count and data bytes according to gguf's own (slow) reader."""
    reader = gguf.GGUFReader(path)
    return (
        sum(int(np.prod(t.shape)) for t in reader.tensors),
        sum(int(t.n_bytes) for t in reader.tensors),
    )


def _reason(path: Path) -> str:
    with pytest.raises(ModelFileError) as caught:
        read_gguf(path)
    assert caught.value.path == str(path)
    return caught.value.reason


def test_header_fields_match_what_was_written(tiny_gguf) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    path = tiny_gguf(
        "fields", n_layer=3, n_embd=96, n_head=6, n_kv_head=3, n_ff=160,
        context_length=1024, chat_template=template,
    )
    info = read_gguf(path)
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    assert isinstance(info, GGUFInfo)
    assert info.path == path.resolve()
    assert info.file_size == path.stat().st_size
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name == "fields"
    assert info.file_type == "F32"
    assert (info.context_length, info.n_layer, info.n_embd) == (1024, 3, 96)
    assert (info.n_head, info.n_kv_head) == (6, 3)
    assert (info.head_dim_k, info.head_dim_v) == (16, 16)
    assert info.sliding_window is None
    assert info.vocab_size == len(tokens.data) > 256
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.chat_template == template and info.has_chat_template
    assert info.metadata["llama.rope.freq_base"] == 10000.0
    assert info.metadata["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.tokens" not in info.metadata  # arrays are skipped, not kept
    with pytest.raises(TypeError):
        info.metadata["x"] = 1  # type: ignore[index]


def test_parameter_count_and_bytes_match_the_tensor_shapes(tiny_gguf) -> None:
    path = tiny_gguf("shapes")
    info = read_gguf(path)
    n_vocab, n_embd, n_ff, n_layer, kv_dim = info.vocab_size, 64, 128, 2, 2 * 16
    per_layer = 2 * n_embd + 2 * n_embd * n_embd + 2 * n_embd * kv_dim + 3 * n_embd * n_ff
    expected = 2 * n_vocab * n_embd + n_embd + n_layer * per_layer
    assert info.parameter_count == expected
    assert (info.parameter_count, info.tensor_bytes) == _reference(path)
    assert info.tensor_bytes == 4 * expected  # all F32
    assert info.tensor_bytes < info.file_size


def test_f16_model_reports_f16_and_its_byte_count(tiny_gguf) -> None:
    path = tiny_gguf("half", dtype="f16")
    info = read_gguf(path)
    assert info.file_type == "F16"
    assert (info.parameter_count, info.tensor_bytes) == _reference(path)
    assert info.tensor_bytes < 4 * info.parameter_count


def test_model_without_chat_template(tiny_gguf) -> None:
    info = read_gguf(tiny_gguf("plain"))
    assert info.chat_template is None and not info.has_chat_template


def test_every_value_type_per_layer_arrays_and_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.bool", False)
    w.add_string("t.str", "héllo")
    w.add_array("t.strings", ["a", "bb", ""])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.nested_strings", [["x"], ["y", "z"]])
    w.add_head_count([4, 8, 8])
    w.add_head_count_kv([1, 4, 2])
    w.add_embedding_length(64)
    w.add_tensor("a.weight", np.ones((3, 5), dtype=np.float32))  # 60 bytes: padded to 64
    w.add_tensor("b.weight", np.ones(7, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    info = read_gguf(path)
    m = info.metadata
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -100, 60000, -30000)
    assert (m["t.u32"], m["t.i32"]) == (4_000_000_000, -2_000_000_000)
    assert (m["t.u64"], m["t.i64"]) == (2**63 + 5, -(2**62))
    assert (m["t.f32"], m["t.f64"], m["t.bool"], m["t.str"]) == (0.5, 1e300, False, "héllo")
    assert m["general.alignment"] == 64
    assert not {"t.strings", "t.nested", "t.nested_strings"} & m.keys()
    assert (info.n_head, info.n_kv_head) == (8, 4)  # per-layer arrays: the maximum
    assert info.head_dim_k == 64 // 8
    assert (info.parameter_count, info.tensor_bytes) == (22, 74)
    assert info.file_type == "F32"  # no general.file_type: the type with the most bytes
    assert info.vocab_size == 0 and info.context_length == 0


def test_bad_magic(tmp_path: Path) -> None:
    reason = _reason(write_bad_magic(tmp_path / "zip.gguf"))
    assert reason == "not a GGUF file (magic b'PK\\x03\\x04')"


def test_truncated_download(tiny_gguf, tmp_path: Path) -> None:
    reason = _reason(write_truncated(tiny_gguf("trunc"), tmp_path / "half.gguf"))
    assert reason.startswith("tensor data extends past end of file (truncated download?)")


def test_one_byte_short_is_caught(tiny_gguf, tmp_path: Path) -> None:
    src = tiny_gguf("short")
    dst = tmp_path / "short.gguf"
    dst.write_bytes(src.read_bytes()[:-1])
    assert "extends past end of file" in _reason(dst)


def test_truncated_inside_the_header(tiny_gguf, tmp_path: Path) -> None:
    reason = _reason(write_truncated(tiny_gguf("trunc"), tmp_path / "stub.gguf", 0.005))
    assert reason.startswith("truncated")


def test_corrupt_header(tiny_gguf, tmp_path: Path) -> None:
    reason = _reason(write_corrupt_header(tiny_gguf("corrupt"), tmp_path / "bad.gguf"))
    assert reason.startswith("corrupt header: claims") and "key/value pairs" in reason


@pytest.mark.parametrize(
    ("version", "expected"),
    [(1, "GGUF v1 is no longer supported"), (4, "unsupported GGUF version 4"),
     (0x03000000, "big-endian")],
)
def test_unsupported_versions(tiny_gguf, tmp_path: Path, version: int, expected: str) -> None:
    data = bytearray(tiny_gguf("version").read_bytes())
    data[4:8] = struct.pack("<I", version)
    path = tmp_path / "v.gguf"
    path.write_bytes(bytes(data))
    assert expected in _reason(path)


def test_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.gguf") == "file not found"


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    assert _reason(tmp_path / "dir.gguf") == "is a directory, not a GGUF file"


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert _reason(tmp_path / "empty.gguf").startswith("not a GGUF file")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.gguf")
    assert _reason(tmp_path / "pipe.gguf") == "not a regular file"


def test_unreadable_file(tiny_gguf, tmp_path: Path) -> None:
    path = tmp_path / "locked.gguf"
    shutil.copy(tiny_gguf("locked"), path)
    path.chmod(0)
    if os.geteuid() != 0:
        assert "permission denied" in _reason(path)
        return
    # Root reads any file whatever its mode: read it from a user namespace, where we are not.
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("running as root without unshare (util-linux) to drop privileges")
    tmp_path.chmod(0o755)
    code = ("from corral.backend.errors import ModelFileError\n"
            "from corral.backend.ggufmeta import read_gguf\n"
            f"try:\n    read_gguf({str(path)!r})\nexcept ModelFileError as e:\n    print(e.reason)\n")
    done = subprocess.run([unshare, "--user", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "permission denied" in done.stdout


def test_unknown_architecture_reads_fine(tmp_path: Path) -> None:
    assert read_gguf(write_unknown_arch(tmp_path / "odd.gguf")).architecture == "notanarch"


def test_flipped_and_cut_bytes_only_ever_give_model_file_error(tmp_path: Path) -> None:
    """Damage a valid file at many places: the reader must answer or explain, never crash."""
    src = write_tiny_llama(tmp_path / "src.gguf", n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                           n_ff=32)
    original = src.read_bytes()
    info = read_gguf(src)
    header_end = len(original) - info.tensor_bytes - 64  # tensor data is not parsed
    rng = random.Random(1234)
    positions = list(range(64)) + rng.sample(range(64, header_end), 1500)
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(original)
    outcomes = {"ok": 0, "error": 0}
    with open(path, "r+b") as f:
        for i, pos in enumerate(positions):
            for value in (original[pos] ^ 0xFF, rng.randrange(256), 0):
                f.seek(pos)
                f.write(bytes([value]))
                f.flush()
                os.utime(path, ns=(i * 3 + value, i * 3 + value + 1_000_000_000))
                try:
                    read_gguf(path)
                    outcomes["ok"] += 1
                except ModelFileError as exc:
                    assert exc.reason
                    outcomes["error"] += 1
            f.seek(pos)
            f.write(original[pos : pos + 1])
    for n, cut in enumerate(sorted(rng.sample(range(len(original)), 300))):
        path.write_bytes(original[:cut])
        os.utime(path, ns=(n, 2_000_000_000 + n))
        with pytest.raises(ModelFileError):
            read_gguf(path)
    assert outcomes["error"] > 500 and outcomes["ok"] > 100  # both paths were exercised


def test_cache_hit_is_fast_and_mtime_invalidates(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "cached.gguf", name="aaaa")
    first = read_gguf(path)
    start = time.perf_counter()
    again = read_gguf(path)
    assert time.perf_counter() - start < 0.005
    assert again is first

    mtime = path.stat().st_mtime_ns
    write_tiny_llama(path, name="bbbb")  # same size, different content
    os.utime(path, ns=(mtime, mtime))
    assert read_gguf(path) is first  # the key is (path, size, mtime), not the content
    os.utime(path, ns=(mtime + 1, mtime + 1))
    changed = read_gguf(path)
    assert changed is not first and changed.name == "bbbb"


def test_the_default_model_header() -> None:
    from corral.backend.catalog import default_model_path

    path = default_model_path()
    ggufmeta._read_cached.cache_clear()
    start = time.perf_counter()
    info = read_gguf(path)
    elapsed = time.perf_counter() - start
    assert info.architecture == "gemma3"
    assert info.n_layer == 18
    assert info.context_length > 0
    assert info.file_type == "Q4_K_M"
    assert info.chat_template is None and not info.has_chat_template
    assert info.vocab_size == 262_144
    assert (info.n_head, info.n_kv_head, info.head_dim_k) == (4, 1, 256)
    assert info.sliding_window == 512
    assert info.parameter_count == 268_098_176  # as gguf.GGUFReader counts it
    assert elapsed < 0.5, f"uncached header read took {elapsed:.2f} s"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_tiny_models_load_and_generate_in_llama_cpp(tiny_gguf, dtype: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tiny_gguf("generate", dtype=dtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        assert len(llm.tokenize(b"Once upon a time")) == 5  # <s> and four word pieces
        assert len(llm.tokenize("naïve 🙂 text".encode())) > 4  # byte fallback
        out = llm.create_completion("Once upon a time", max_tokens=8, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1
        assert llm.n_vocab() == read_gguf(path).vocab_size
    finally:
        llm.close()


def test_llama_cpp_refuses_what_the_reader_refuses(tiny_gguf, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    src = tiny_gguf("refused")
    broken = [
        write_bad_magic(tmp_path / "zip.gguf"),
        write_truncated(src, tmp_path / "half.gguf"),
        write_corrupt_header(src, tmp_path / "corrupt.gguf"),
    ]
    for path in broken:
        with pytest.raises(ModelFileError):
            read_gguf(path)
    # The unknown architecture reads fine here; the catalog marks it, llama.cpp refuses it.
    for path in [*broken, write_unknown_arch(tmp_path / "odd.gguf")]:
        with pytest.raises(ValueError, match="Failed to load model"):
            llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
