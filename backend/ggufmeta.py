"""A small, bounds-checked reader for the header of a GGUF file.

Why not `gguf.GGUFReader`: it materialises every array (the default model's 262k-entry
vocabulary takes ~10 s) and fails on a bad file with a bare IndexError. The catalog and the
memory estimate need only scalars, a few lengths and the tensor table, and they must turn any
broken file into a `ModelFileError` a person can act on. So this reader walks the header
once, skips arrays without building them, checks every length against the file size before
reading it, and caches the result by path, size and mtime.

Layout (little-endian, GGUF v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 kv
count, the key/value pairs, the tensor infos, padding to `general.alignment`, tensor data.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from .errors import ModelFileError

Scalar = str | int | float | bool

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Limits. llama.cpp accepts strings and arrays up to 2**30; a header that claims more than
# the file can hold is caught by the size checks, these catch what is merely absurd.
_MAX_KEY_LENGTH = 65_535  # the GGUF spec's limit
_MAX_STRING_VALUE = 64 * 1024 * 1024  # scalar strings we keep (chat templates are KBs)
_MAX_ARRAY_STRING = 1 << 30  # strings inside arrays are skipped, never kept
_MAX_ARRAY_LENGTH = 1 << 30  # llama.cpp's GGUF_MAX_ARRAY_ELEMENTS
_MAX_ARRAY_DEPTH = 4  # nested arrays are legal GGUF; deeper nesting is corruption
_MAX_COUNT = 1 << 24  # tensors or kv pairs; real models have a few thousand
_MAX_TENSOR_NAME = 63  # llama.cpp: GGML_MAX_NAME (64) including the NUL
_MAX_DIMS = 4  # GGML_MAX_DIMS
_INT64_MAX = (1 << 63) - 1
_READ_CHUNK = 1 << 20

# GGUF value types: id -> struct format of the fixed-size scalars; 8 and 9 are special.
_T_STRING = 8
_T_ARRAY = 9
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",  # UINT8
    1: "<b",  # INT8
    2: "<H",  # UINT16
    3: "<h",  # INT16
    4: "<I",  # UINT32
    5: "<i",  # INT32
    6: "<f",  # FLOAT32
    7: "<?",  # BOOL (one byte)
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_SCALAR_STRUCTS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")

# ggml tensor types: id -> (name, elements per block, bytes per block), as in ggml.c's
# type_traits. Embedded because `gguf` is a test dependency only.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# llama_ftype (general.file_type) -> the label people know from file names.
LLAMA_FTYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}
_FTYPE_GUESSED = 1024


@dataclass(frozen=True)
class GGUFInfo:
    """What corral needs to know about a GGUF file without loading it."""

    path: Path
    file_size: int
    version: int
    architecture: str
    name: str | None
    parameter_count: int
    tensor_bytes: int
    file_type: str
    context_length: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim_k: int
    head_dim_v: int
    sliding_window: int | None
    vocab_size: int
    chat_template: str | None = field(repr=False)
    bos_token_id: int | None
    eos_token_id: int | None
    # A read-only view; excluded from hashing because mapping proxies are unhashable.
    metadata: Mapping[str, Scalar] = field(repr=False, hash=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)


class _HeaderError(Exception):
    """Internal: a reason; `read_gguf` adds the path and turns it into ModelFileError."""


class _Reader:
    """Sequential reads over a file with a sliding buffer, each checked against its size.

    A buffer (not one `read` per field) because skipping a 262k-string vocabulary means
    262k length fields; not mmap because a file shrinking under a mapping kills the
    process with SIGBUS.
    """

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size
        self._buf = b""
        self._base = 0  # file offset of _buf[0]
        self._pos = 0  # index into _buf

    def tell(self) -> int:
        return self._base + self._pos

    def _check_room(self, n: int, what: str) -> int:
        """The cursor's file offset, after checking that n more bytes fit in the file."""
        here = self.tell()
        if here + n > self.size:
            raise _HeaderError(
                f"truncated: {what} at byte {here} needs {n} bytes "
                f"but the file has {self.size} bytes"
            )
        return here

    def _fill(self, n: int, what: str) -> None:
        """Make n bytes available at the cursor, or explain why the file cannot hold them."""
        here = self._check_room(n, what)
        if self._pos + n <= len(self._buf):
            return
        rest = self._buf[self._pos :]
        self._f.seek(here + len(rest))
        more = self._f.read(max(n - len(rest), _READ_CHUNK))
        self._buf = rest + more
        self._base = here
        self._pos = 0
        if len(self._buf) < n:
            raise _HeaderError(f"file shrank while being read (at byte {here})")

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        self._fill(st.size, what)
        value = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return value

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)[0]

    def skip(self, n: int, what: str) -> None:
        here = self._check_room(n, what)
        if self._pos + n <= len(self._buf):
            self._pos += n
        else:
            self._buf = b""
            self._base = here + n
            self._pos = 0

    def string(self, limit: int, what: str) -> str:
        length = self.u64(f"length of {what}")
        if length > limit:
            raise _HeaderError(f"corrupt header: {what} claims {length} bytes (limit {limit})")
        self._fill(length, what)
        raw = self._buf[self._pos : self._pos + length]
        self._pos += length
        # Lenient like llama.cpp, which never validates UTF-8: a stray byte is not a reason
        # to refuse a model it would load.
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` length-prefixed strings without decoding them (the vocab case)."""
        buf, pos, unpack = self._buf, self._pos, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > len(buf):
                self._pos = pos
                self._fill(8, f"string length in {what}")
                buf, pos = self._buf, self._pos
            (length,) = unpack(buf, pos)
            pos += 8
            if length > _MAX_ARRAY_STRING:
                raise _HeaderError(f"corrupt header: a string in {what} claims {length} bytes")
            if pos + length > len(buf):
                self._pos = pos
                self.skip(length, f"string in {what}")
                buf, pos = self._buf, self._pos
            else:
                pos += length
        self._pos = pos


def _element_size(elem_type: int) -> int:
    """The fewest bytes one array element can take (a string's length field alone is 8)."""
    if elem_type in _SCALAR_STRUCTS:
        return _SCALAR_STRUCTS[elem_type].size
    return 12 if elem_type == _T_ARRAY else 8


def _array_header(reader: _Reader, key: str) -> tuple[int, int]:
    """Read an array's element type and length, rejecting lengths the file cannot hold."""
    elem_type = reader.u32(f"element type of array {key!r}")
    count = reader.u64(f"length of array {key!r}")
    remaining = reader.size - reader.tell()
    if count > _MAX_ARRAY_LENGTH:
        raise _HeaderError(f"corrupt header: array {key!r} claims {count} elements")
    if count * _element_size(elem_type) > remaining:
        raise _HeaderError(
            f"truncated or corrupt header: array {key!r} claims {count} elements "
            f"but only {remaining} bytes remain in the file"
        )
    return elem_type, count


def _skip_array(reader: _Reader, key: str, elem_type: int, count: int, depth: int) -> None:
    if elem_type in _SCALAR_STRUCTS:
        reader.skip(count * _SCALAR_STRUCTS[elem_type].size, f"array {key!r}")
    elif elem_type == _T_STRING:
        reader.skip_strings(count, f"array {key!r}")
    elif elem_type == _T_ARRAY:
        if depth >= _MAX_ARRAY_DEPTH:
            raise _HeaderError(f"corrupt header: array {key!r} is nested too deeply")
        for _ in range(count):
            inner_type, inner_count = _array_header(reader, key)
            _skip_array(reader, key, inner_type, inner_count, depth + 1)
    else:
        raise _HeaderError(f"corrupt header: array {key!r} has unknown element type {elem_type}")


def _int_array_max(reader: _Reader, key: str, elem_type: int, count: int) -> int:
    """Per-layer integer arrays (head counts of some models): only their maximum matters."""
    st = _SCALAR_STRUCTS[elem_type]
    best = 0
    for _ in range(count):
        best = max(best, int(reader.unpack(st, f"array {key!r}")[0]))
    return best


# Keys that some models store per layer as arrays ({arch}.attention.head_count_kv of
# models mixing attention kinds); the memory estimate needs their maximum.
_MAX_OF_ARRAY_SUFFIXES = (".attention.head_count", ".attention.head_count_kv")
_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})


def _parse(f: BinaryIO, path: Path, size: int) -> GGUFInfo:
    reader = _Reader(f, size)
    if size < 4:
        raise _HeaderError(f"not a GGUF file (only {size} bytes)")
    magic = reader.unpack(struct.Struct("4s"), "magic")[0]
    if magic != GGUF_MAGIC:
        raise _HeaderError(f"not a GGUF file (magic {magic!r})")
    version = reader.u32("version")
    if version & 0xFFFF == 0 and version:
        raise _HeaderError("big-endian GGUF files are not supported")
    if version == 1:
        raise _HeaderError("GGUF v1 is no longer supported; convert the model again")
    if version not in (2, 3):
        raise _HeaderError(f"unsupported GGUF version {version} (supported: 2 and 3)")
    n_tensors = reader.u64("tensor count")
    n_kv = reader.u64("key/value count")
    remaining = size - reader.tell()
    # Smallest kv pair: 8 (key length) + 1 (key) + 4 (type) + 1 (value); tensor info:
    # 8 + 1 + 4 (n_dims) + 4 (type) + 8 (offset).
    for count, what, smallest in ((n_kv, "key/value pairs", 14), (n_tensors, "tensors", 25)):
        if count > _MAX_COUNT:
            raise _HeaderError(f"corrupt header: claims {count} {what}")
        if count * smallest > remaining:
            raise _HeaderError(
                f"truncated or corrupt header: claims {count} {what} "
                f"but the file has only {size} bytes"
            )

    metadata: dict[str, Scalar] = {}
    array_keys: set[str] = set()
    array_max: dict[str, int] = {}
    vocab_from_tokens: int | None = None
    for i in range(n_kv):
        key = reader.string(_MAX_KEY_LENGTH, f"key #{i}")
        if not key:
            raise _HeaderError(f"corrupt header: key #{i} is empty")
        if key in metadata or key in array_keys:
            raise _HeaderError(f"corrupt header: duplicate key {key!r}")
        vtype = reader.u32(f"type of {key!r}")
        if vtype in _SCALAR_STRUCTS:
            value = reader.unpack(_SCALAR_STRUCTS[vtype], f"value of {key!r}")[0]
            metadata[key] = value
        elif vtype == _T_STRING:
            metadata[key] = reader.string(_MAX_STRING_VALUE, f"value of {key!r}")
        elif vtype == _T_ARRAY:
            array_keys.add(key)
            elem_type, count = _array_header(reader, key)
            if key == "tokenizer.ggml.tokens":
                vocab_from_tokens = count
            if key.endswith(_MAX_OF_ARRAY_SUFFIXES) and elem_type in _INT_TYPES:
                array_max[key] = _int_array_max(reader, key, elem_type, count)
            else:
                _skip_array(reader, key, elem_type, count, depth=1)
        else:
            raise _HeaderError(f"corrupt header: key {key!r} has unknown value type {vtype}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise _HeaderError(f"corrupt header: general.alignment {alignment!r} is not a power of 2")

    parameter_count = 0
    tensor_bytes = 0
    bytes_by_type: dict[str, int] = {}
    tensors: list[tuple[str, int, int]] = []  # name, offset, nbytes
    seen_names: set[str] = set()
    for i in range(n_tensors):
        name = reader.string(_MAX_TENSOR_NAME, f"name of tensor #{i}")
        if name in seen_names:
            raise _HeaderError(f"corrupt header: duplicate tensor name {name!r}")
        seen_names.add(name)
        n_dims = reader.u32(f"dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise _HeaderError(f"corrupt header: tensor {name!r} has {n_dims} dimensions")
        dims = [reader.u64(f"shape of tensor {name!r}") for _ in range(n_dims)]
        elements = 1
        for d in dims:
            elements *= d
        if any(d > _INT64_MAX for d in dims) or elements > _INT64_MAX:
            raise _HeaderError(f"corrupt header: tensor {name!r} has an impossible shape {dims}")
        type_id = reader.unpack(_I32, f"type of tensor {name!r}")[0]
        if type_id not in GGML_TYPES:
            raise _HeaderError(
                f"tensor {name!r} has unknown ggml type {type_id} "
                "(a quantization newer than corral, or a corrupt header)"
            )
        type_name, block, type_size = GGML_TYPES[type_id]
        row = dims[0] if dims else 1
        if row % block:
            raise _HeaderError(
                f"corrupt header: tensor {name!r} of type {type_name} has rows of {row} "
                f"elements, not a multiple of its block size {block}"
            )
        nbytes = elements // block * type_size
        offset = reader.u64(f"data offset of tensor {name!r}")
        tensors.append((name, offset, nbytes))
        parameter_count += elements
        tensor_bytes += nbytes
        bytes_by_type[type_name] = bytes_by_type.get(type_name, 0) + nbytes

    header_end = reader.tell()
    data_start = -(-header_end // alignment) * alignment
    # llama.cpp requires the tensors to be packed in order, each padded to the alignment;
    # checking the same here names the broken tensor instead of a generic load failure.
    expected = 0
    for name, offset, nbytes in tensors:
        if offset != expected:
            raise _HeaderError(
                f"corrupt tensor table: tensor {name!r} has data offset {offset}, "
                f"expected {expected}"
            )
        expected = offset + -(-nbytes // alignment) * alignment
    if tensors:
        _, last_offset, last_nbytes = tensors[-1]
        data_end = data_start + last_offset + last_nbytes
        if data_end > size:
            raise _HeaderError(
                f"tensor data extends past end of file (truncated download?): "
                f"needs {data_end} bytes, file has {size} "
                f"({100 * size / data_end:.1f}% present)"
            )

    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise _HeaderError("no general.architecture in the header: not a llama.cpp model file")

    def optional_int(key: str) -> int | None:
        if key in array_max:
            return array_max[key]
        value = metadata.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _HeaderError(f"key {key!r} should be an integer, found {value!r}")
        return value

    def get_int(key: str, default: int) -> int:
        value = optional_int(key)
        return default if value is None else value

    a = architecture
    n_embd = get_int(f"{a}.embedding_length", 0)
    n_head = get_int(f"{a}.attention.head_count", 0)
    head_dim_k = get_int(f"{a}.attention.key_length", n_embd // n_head if n_head else 0)
    vocab_size = vocab_from_tokens
    if vocab_size is None:
        vocab_size = get_int(f"{a}.vocab_size", 0)

    ftype = metadata.get("general.file_type")
    if isinstance(ftype, int) and (ftype & ~_FTYPE_GUESSED) in LLAMA_FTYPES:
        file_type = LLAMA_FTYPES[ftype & ~_FTYPE_GUESSED]
    elif bytes_by_type:
        file_type = max(bytes_by_type.items(), key=lambda kv: kv[1])[0]
    else:
        file_type = "unknown"

    model_name = metadata.get("general.name")
    template = metadata.get("tokenizer.chat_template")
    return GGUFInfo(
        path=path,
        file_size=size,
        version=version,
        architecture=architecture,
        name=model_name if isinstance(model_name, str) else None,
        parameter_count=parameter_count,
        tensor_bytes=tensor_bytes,
        file_type=file_type,
        context_length=get_int(f"{a}.context_length", 0),
        n_layer=get_int(f"{a}.block_count", 0),
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=get_int(f"{a}.attention.head_count_kv", n_head),
        head_dim_k=head_dim_k,
        head_dim_v=get_int(f"{a}.attention.value_length", head_dim_k),
        sliding_window=optional_int(f"{a}.attention.sliding_window"),
        vocab_size=vocab_size,
        chat_template=template if isinstance(template, str) else None,
        bos_token_id=optional_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=optional_int("tokenizer.ggml.eos_token_id"),
        metadata=MappingProxyType(metadata),
    )


@functools.lru_cache(maxsize=256)
def _read_cached(path: Path, size: int, mtime_ns: int) -> GGUFInfo:
    """Parse once per (file, size, mtime): a re-downloaded or edited file is read again.

    Failures are not cached (lru_cache never caches exceptions), so a fixed file is seen.
    """
    with open(path, "rb") as f:
        return _parse(f, path, os.fstat(f.fileno()).st_size)


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's header; raise ModelFileError with a reason for any bad file."""
    given = Path(path)
    try:
        resolved = given.resolve()
        st = resolved.stat()
    except FileNotFoundError:
        raise ModelFileError(str(given), "file not found") from None
    except PermissionError:
        raise ModelFileError(str(given), "permission denied") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise ModelFileError(str(given), f"cannot access: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(str(given), "is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(str(given), "not a regular file")
    if not os.access(resolved, os.R_OK):
        raise ModelFileError(str(given), "permission denied (the file is not readable)")
    try:
        return _read_cached(resolved, st.st_size, st.st_mtime_ns)
    except _HeaderError as exc:
        raise ModelFileError(str(given), str(exc)) from None
    except OSError as exc:
        raise ModelFileError(str(given), f"cannot read: {exc.strerror or exc}") from None
