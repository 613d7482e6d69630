"""Route llama.cpp's log lines into Python logging instead of the terminal.

`import llama_cpp` installs a callback that prints every llama.cpp line to stderr, which
corrupts a TUI and floods a server log (about 1,500 lines for one load). `install()` replaces
it with ours. The callback object lives at module level: ctypes does not keep it alive, and a
collected callback makes later llama.cpp calls fail in strange ways.

llama.cpp reports *why* a load failed only in these lines (`llama_model_load_from_file`
returns NULL for every corrupt file), so a thread can `capture()` the lines logged while it
loads and put the errors into the exception it raises. A thread that loads or runs a model
also names that model's `ModelLog` with `attributed()`, and every line it logs meanwhile goes
into that ring as well (the console's log view).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp

from .modellog import ModelLog

logger = logging.getLogger("corral.llama")

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
# llama.cpp's own level names, for a ModelLog; it keeps the lines llama.cpp's tools print by
# default (info and up): the debug ones are ~90 % of a load's and some 20 a decode step
_NAMES = {2: "info", 3: "warning", 4: "error"}
_CONT = 5

_local = threading.local()
_install_lock = threading.Lock()
_installed = False


class _Capture:
    """Lines one thread logged while capturing: (python level, text)."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def problems(self, limit: int = 6) -> list[str]:
        """Warning and error lines, the most telling part of a failed load."""
        found = [text for level, text in self.lines if level >= logging.WARNING]
        return found[-limit:]


def _emit(ggml_level: int, text: str) -> None:
    level = _LEVELS.get(ggml_level, logging.DEBUG)
    logger.log(level, "%s", text)
    capture: _Capture | None = getattr(_local, "capture", None)
    if capture is not None:
        capture.lines.append((level, text))
    sink: ModelLog | None = getattr(_local, "sink", None)
    if sink is not None and ggml_level in _NAMES:
        sink.add(_NAMES[ggml_level], text)


def _on_log(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
    """Join fragments into whole lines (llama.cpp writes some lines in several calls)."""
    if not text:
        return
    chunk = text.decode("utf-8", errors="replace")
    pending: str = getattr(_local, "pending", "")
    pending_level: int = getattr(_local, "pending_level", 1)  # llama.cpp's level of the line being joined
    if level != _CONT:
        pending_level = level
    pending += chunk
    *lines, pending = pending.split("\n")
    for line in lines:
        if line.strip():
            _emit(pending_level, line.rstrip())
    _local.pending = pending
    _local.pending_level = pending_level


_CALLBACK = llama_cpp.llama_log_callback(_on_log)


def install() -> None:
    """Install our callback once per process (idempotent, thread-safe)."""
    global _installed
    with _install_lock:
        if not _installed:
            llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
            _installed = True


@contextmanager
def capture() -> Iterator[_Capture]:
    """Collect this thread's llama.cpp lines for the duration of the block."""
    previous = getattr(_local, "capture", None)
    current = _Capture()
    _local.capture = current
    try:
        yield current
    finally:
        _local.capture = previous


@contextmanager
def attributed(sink: ModelLog | None) -> Iterator[None]:
    """Add this thread's llama.cpp lines to `sink` (one model's ring) for the duration of the
    block; None adds them nowhere."""
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = previous
