"""KV state of a model's recent conversations, kept when the model is evicted or the server stops
and given back when the model loads again, so the next turn of a long conversation starts in
the time of a restore rather than of evaluating its prompt again.

Each saved prefix is llama.cpp's own state of one sequence (`llama_state_seq_get_data`) and the
tokens it holds. Prefixes are filed under a key of everything their validity rests on: the
model file (resolved path, size, mtime), the context's size and attention kind, and the
llama.cpp build. A load under another key restores nothing, and llama.cpp checks the state's
layout again when it is set (a refusal drops that prefix).

Two budgets bound it: `ram` bytes stay in this process (an evicted model loaded again restores
from memory); `disk` bytes are written to files for the next process. In each, what was saved
longest ago goes first.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

log = logging.getLogger("corral.kvstore")

_MAGIC = b"CKV1"
_HEAD = struct.Struct("<4sI")  # magic, JSON header length


@dataclass(frozen=True)
class Prefix:
    """One sequence's KV state and the tokens it holds."""

    tokens: tuple[int, ...]
    state: bytes | bytearray  # bytearray as it left llama.cpp, bytes as read from a file

    @property
    def size(self) -> int:
        return len(self.state)


def prefix_key(model_path: str, *, n_ctx: int, flash_attn: bool, kv_types: tuple[str, str] = ("f16", "f16")) -> str:
    """The key saved state is valid under: another file, context size, attention kind, KV cache
    types or llama.cpp build gives another key."""
    resolved = Path(model_path).resolve()
    st = resolved.stat()
    facts = [str(resolved), st.st_size, st.st_mtime_ns, n_ctx, flash_attn, llama_cpp.__version__]
    if kv_types != ("f16", "f16"):  # the f16 key stays what it was: state saved before still restores
        facts.append(list(kv_types))
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


class PrefixStore:
    """Saved prefixes by key, within a RAM and a disk budget (bytes; 0 keeps none there).
    Thread-safe: engines save from the thread that closes them and load from their own."""

    def __init__(self, ram: int, disk: int, directory: Path | None) -> None:
        self.ram, self.disk, self.directory = ram, disk if directory is not None else 0, directory
        self._memory: OrderedDict[str, list[Prefix]] = OrderedDict()  # least recently saved first
        self._lock = threading.Lock()

    def budget(self, ram: int, disk: int) -> None:
        """New budgets (a config reload); what no longer fits goes at the next save."""
        with self._lock:
            self.ram, self.disk = ram, disk if self.directory is not None else 0

    def save(self, key: str, prefixes: list[Prefix]) -> None:
        """Keep `prefixes` (most recent first) as what `key` holds now, within the budgets."""
        with self._lock:
            self._memory.pop(key, None)
            kept = _within(prefixes, self.ram)
            if kept:
                self._memory[key] = kept
            while sum(p.size for held in self._memory.values() for p in held) > self.ram:
                self._memory.popitem(last=False)
            if self.disk > 0:
                self._write(key, _within(prefixes, self.disk))

    def load(self, key: str) -> list[Prefix]:
        """What `key` holds, most recent first: from memory, else from disk."""
        with self._lock:
            held = self._memory.get(key)
            if held is not None:
                return list(held)
            return self._read(key) if self.disk > 0 else []

    def _file(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.kv"

    def _write(self, key: str, prefixes: list[Prefix]) -> None:
        path = self._file(key)
        try:
            if not prefixes:
                path.unlink(missing_ok=True)
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            header = json.dumps({"prefixes": [{"tokens": list(p.tokens), "size": p.size} for p in prefixes]})
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            with open(temporary, "wb") as out:
                out.write(_HEAD.pack(_MAGIC, len(header)) + header.encode())
                for prefix in prefixes:
                    out.write(prefix.state)
            os.replace(temporary, path)
            self._trim_disk(keep=path)
        except OSError as exc:
            log.warning("cannot save KV state to %s: %s", path, exc)

    def _trim_disk(self, keep: Path) -> None:
        """Delete the oldest files until those left fit the disk budget (`keep` is within it)."""
        assert self.directory is not None
        files = sorted((p for p in self.directory.glob("*.kv") if p != keep), key=lambda p: p.stat().st_mtime)
        total = keep.stat().st_size + sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.disk:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)

    def _read(self, key: str) -> list[Prefix]:
        path = self._file(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read saved KV state %s: %s", path, exc)
            return []
        try:
            magic, length = _HEAD.unpack_from(data)
            if magic != _MAGIC:
                raise ValueError("not a saved KV state")
            entries = json.loads(data[_HEAD.size:_HEAD.size + length])["prefixes"]
            offset, prefixes = _HEAD.size + length, []
            for entry in entries:
                size = int(entry["size"])
                if offset + size > len(data):
                    raise ValueError("truncated")
                prefixes.append(Prefix(tuple(int(t) for t in entry["tokens"]), data[offset:offset + size]))
                offset += size
            return prefixes
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("ignoring saved KV state %s: %s", path, exc)
            return []


def _within(prefixes: list[Prefix], budget: int) -> list[Prefix]:
    """The leading (most recent) prefixes whose sizes fit `budget`."""
    kept, total = [], 0
    for prefix in prefixes:
        if total + prefix.size > budget:
            break
        kept.append(prefix)
        total += prefix.size
    return kept



def sequence_state(ctx: llama_cpp.llama_context_p, seq_id: int, limit: int) -> bytearray | None:
    """llama.cpp's state of one sequence (written straight into the returned buffer: a state
    is tens of MB), None when it is larger than `limit` bytes."""
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    if size > limit:
        return None
    state = bytearray(size)
    written = llama_cpp.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(state), size, seq_id)
    if not written:
        return None
    del state[written:]
    return state


def set_sequence_state(ctx: llama_cpp.llama_context_p, seq_id: int, state: bytes | bytearray) -> bool:
    """Load a saved state into sequence `seq_id` (empty); False when llama.cpp refuses it."""
    view = (ctypes.c_uint8 * len(state)).from_buffer(state) if isinstance(state, bytearray) else (
        ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    return bool(llama_cpp.llama_state_seq_set_data(ctx, view, len(state), seq_id))
