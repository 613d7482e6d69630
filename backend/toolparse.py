"""Reading tool calls out of a model's raw output, as it streams: answer text plus OpenAI-style
call deltas (index, id and name first, then argument fragments), by the model's family format
(toolcalls.py says which formats exist and how they look).

The output arrives in pieces split anywhere, even inside a marker, so text that could be the
start of a marker is held back; arguments stream as they arrive; anything that turns out not to
be a well-formed call of a listed tool is answer text after all. The parser never raises.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any

from .generation import ToolCallDelta
from .reasoning import marker_start
from .request import Tool
from .toolcalls import ToolFormat


class _End(Exception):
    """The output ended."""


class _NotACall(Exception):
    """Text after an opening marker is not a call: it is answer text after all."""


class _Deviation(Exception):
    """A call that is not in the canonical shape (name first, then arguments): read whole."""


class _Scan:
    """Where one JSON object or array ends, one character at a time (strings and nesting only)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def push(self, ch: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            self.done = self.depth <= 0


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ALNUM = string.ascii_letters + string.digits

_MARKER = object()  # what the reader yields while it waits in answer text for a marker
Reader = Generator[object, "str | None", Any]


class ToolCallParser:
    """Raw model output, in pieces split anywhere, to answer text and call deltas.

    `feed(text)` and `finish()` return (content, deltas). The first delta of a call carries
    its `index`, `id` and `name`; later ones more of its arguments' JSON text. Text that could
    still be the start of a marker is held back; text inside a call never reaches the content.
    Call arguments stream as they arrive (the tool grammar keeps them valid JSON). Anything
    after a marker that turns out not to be a call is given back as content, never dropped,
    and nothing here raises on odd output. `calls` counts the calls so far, for the caller's
    finish_reason "tool_calls"."""

    def __init__(self, fmt: ToolFormat, tools: Sequence[Tool]) -> None:
        self.format = fmt
        self.calls = 0
        self._names = {tool.name for tool in tools}
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._args: list[str] = []  # argument text of the open call not yet in a delta
        self._raw: list[str] = []  # text read since the last call or marker: content if no call follows
        self._back: list[str] = []  # characters read ahead and put back
        self._owned = False  # the raw text is a call's (already sent as deltas), not content
        self._produced = False  # the current block (after a marker) gave a call or streamed text
        self._listing = False  # inside a block or list of calls: text the end cuts off there is a call's
        self._marker: str | None = None  # the marker answer text runs up to (None: the rest is text)
        self._held = ""  # answer text that could be the marker's beginning
        self._finished = False
        self._reader = self._main()
        self._wanted = next(self._reader)  # a character (None), or _MARKER

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        i = 0
        while i < len(text) and not self._finished:
            if self._wanted is _MARKER:
                i = self._scan(text, i)
            else:
                self._wanted = self._reader.send(text[i])
                i += 1
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if not self._finished:
            self._finished = True
            self._content.append(self._held)
            self._held = ""
            try:
                self._reader.send(None)
            except StopIteration:
                pass
        return self._take()

    def _scan(self, text: str, i: int) -> int:
        """Answer text from text[i] on, in bulk (the reader waits in `_until`), up to the
        marker; returns where reading goes on."""
        buf, marker = self._held + text[i:], self._marker
        at = buf.find(marker) if marker else -1
        if at < 0:
            keep = marker_start(buf, marker) if marker else 0
            self._content.append(buf[:len(buf) - keep])
            self._held = buf[len(buf) - keep:]
            return len(text)
        self._content.append(buf[:at])
        end = i + at + len(marker) - len(self._held)
        self._held = ""
        self._wanted = self._reader.send(marker)
        return end

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        self._flush_args()
        content, deltas = "".join(self._content), list(self._deltas)
        self._content.clear()  # in place: a streamed string writes into this list
        self._deltas.clear()
        return content, deltas

    # -- output --------------------------------------------------------------------------

    def _open_call(self, name: str) -> None:
        self._flush_args()
        self._deltas.append(ToolCallDelta(self.calls, call_id(self.format is ToolFormat.MISTRAL), name))
        self.calls += 1
        self._produced = True
        self._raw.clear()
        self._owned = True

    def _close_call(self) -> None:
        self._raw.clear()
        self._owned = False

    def _flush_args(self) -> None:
        if self._args:
            text, last = "".join(self._args), self._deltas[-1] if self._deltas else None
            self._args.clear()
            if last is not None and last.index == self.calls - 1:
                self._deltas[-1] = replace(last, arguments=last.arguments + text)
            else:
                self._deltas.append(ToolCallDelta(self.calls - 1, arguments=text))

    def _give_back(self) -> None:
        """The text read since the last call or marker is answer text after all (whitespace
        left over between calls is dropped)."""
        text = "".join(self._raw)
        self._raw.clear()
        if text.strip() or not self._produced:
            self._content.append(text)

    # -- reading -------------------------------------------------------------------------

    def _next(self) -> Reader:
        if self._back:
            ch = self._back.pop()
        else:
            ch = yield
            if ch is None:
                raise _End
        self._raw.append(ch)
        return ch

    def _unread(self, ch: str) -> None:
        self._raw.pop()
        self._back.append(ch)

    def _skip_ws(self, also: str = "") -> Reader:
        while True:
            ch = yield from self._next()
            if not ch.isspace() and ch not in also:
                return ch

    def _expect(self, first: str, text: str) -> Reader:
        ch = first
        for i, want in enumerate(text):
            if i:
                ch = yield from self._next()
            if ch != want:
                raise _NotACall

    def _until(self, marker: str | None) -> Reader:
        """Answer text up to `marker` (None: to the end), which `feed` scans in bulk; raw then
        holds the marker."""
        self._marker = marker
        self._held = "".join(reversed(self._back))
        self._back.clear()
        self._raw.clear()
        found = yield _MARKER
        if found is None:
            raise _End
        self._raw[:] = found
        self._produced = False

    def _string(self, sink: list[str] | None = None) -> Reader:
        """A JSON string after its opening quote, decoded; into `sink` as it arrives if given."""
        out = [] if sink is None else sink
        while True:
            ch = yield from self._next()
            if ch == '"':
                return "".join(out) if sink is None else ""
            if ch == "\\":
                ch = yield from self._next()
                if ch == "u":
                    ch = yield from self._unicode_escape()
                elif ch in _ESCAPES:
                    ch = _ESCAPES[ch]
                else:
                    raise _Deviation
            elif ord(ch) < 0x20:
                raise _Deviation
            out.append(ch)
            if sink is not None:
                self._raw.clear()  # streamed: no longer something to give back

    def _unicode_escape(self) -> Reader:
        code = yield from self._hex4()
        if 0xD800 <= code < 0xDC00:
            if (yield from self._next()) != "\\" or (yield from self._next()) != "u":
                raise _Deviation
            low = yield from self._hex4()
            if not 0xDC00 <= low < 0xE000:
                raise _Deviation
            return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
        return "\ufffd" if 0xDC00 <= code < 0xE000 else chr(code)

    def _hex4(self) -> Reader:
        digits = ""
        for _ in range(4):
            digits += yield from self._next()
        if not all(c in string.hexdigits for c in digits):
            raise _Deviation
        return int(digits, 16)

    def _key(self) -> Reader:
        """An object key and its colon."""
        if (yield from self._skip_ws()) != '"':
            raise _Deviation
        key = yield from self._string()
        if (yield from self._skip_ws()) != ":":
            raise _Deviation
        return key

    def _call(self, first: str) -> Reader:
        """One call object whose first character is `first`. The canonical shape (name, then
        arguments) streams; any other is read whole and checked; not a call: _NotACall."""
        if first != "{":
            raise _NotACall
        start = len(self._raw) - 1
        try:
            if (yield from self._key()) != "name" or (yield from self._skip_ws()) != '"':
                raise _Deviation
            name = yield from self._string()
            if name not in self._names or (yield from self._skip_ws()) != ",":
                raise _Deviation
            if (yield from self._key()) not in ("arguments", "parameters") or (yield from self._skip_ws()) != "{":
                raise _Deviation
        except _Deviation:
            yield from self._whole_call(start)
            return
        self._open_call(name)
        scan = _Scan()
        scan.push("{")
        self._args.append("{")
        while not scan.done:
            ch = yield from self._next()
            scan.push(ch)
            self._args.append(ch)
        ch = yield from self._skip_ws()
        if ch == ",":  # more members (Mistral's "id"): skip to the object's end
            scan = _Scan()
            scan.push("{")
            while not scan.done:
                scan.push((yield from self._next()))
        elif ch != "}":
            self._unread(ch)
        self._close_call()

    def _whole_call(self, start: int) -> Reader:
        scan = _Scan()
        for ch in self._raw[start:]:
            scan.push(ch)
        while not scan.done:
            scan.push((yield from self._next()))
        call = self._parse_call("".join(self._raw[start:]))
        if call is None:
            raise _NotACall
        self._emit_call(call)

    def _parse_call(self, text: Any) -> tuple[str, str] | None:
        """(name, arguments JSON) of a call written as JSON text or already parsed, else None."""
        try:
            value = json.loads(text) if isinstance(text, str) else text
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        name, args = value.get("name"), value.get("arguments", value.get("parameters"))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(name, str) or name not in self._names or not isinstance(args, dict):
            return None
        return name, json.dumps(args, ensure_ascii=False)

    def _emit_call(self, call: tuple[str, str]) -> None:
        self._open_call(call[0])
        self._args.append(call[1])
        self._close_call()

    # -- formats -------------------------------------------------------------------------

    def _main(self) -> Reader:
        body = {ToolFormat.HERMES: self._hermes, ToolFormat.LLAMA3: self._llama3,
                ToolFormat.MISTRAL: self._mistral, ToolFormat.GENERIC: self._generic}[self.format]
        try:
            yield from body()
        except _End:
            if self._owned or (self._listing and self.calls):
                # a call cut short (by max_tokens) after others: never answer text. With no call
                # made yet, what was read is given back: it may not have been a call at all.
                self._raw.clear()
            self._give_back()

    def _block(self, body: Reader) -> Reader:
        """A marker's block; afterwards whitespace is dropped up to whatever comes next."""
        self._listing = True  # left set when the end cuts the block: `_main` reads it
        try:
            yield from body
        except _NotACall:
            self._listing = False
            self._give_back()
            return
        self._listing = False
        self._raw.clear()
        self._unread((yield from self._skip_ws()))
        self._raw.clear()

    def _hermes(self) -> Reader:
        while True:
            yield from self._until("<tool_call>")
            yield from self._block(self._hermes_block())

    def _hermes_block(self) -> Reader:
        yield from self._call((yield from self._skip_ws()))
        yield from self._expect((yield from self._skip_ws()), "</tool_call>")

    def _mistral(self) -> Reader:
        while True:
            yield from self._until("[TOOL_CALLS]")
            yield from self._block(self._mistral_block())

    def _mistral_block(self) -> Reader:
        ch = yield from self._skip_ws()
        if ch != "[":  # one call without the list
            yield from self._call(ch)
            return
        while True:
            yield from self._call((yield from self._skip_ws()))
            ch = yield from self._skip_ws()
            if ch == "]":
                return
            if ch != ",":
                raise _NotACall

    def _llama3(self) -> Reader:
        """A bare JSON call is recognised at the start of the output (or right after a call,
        `;`-separated); a call after <|python_tag|> anywhere."""
        bare = True  # a bare call may start here: at the output's start, or right after a call
        while True:
            if bare:
                ch = yield from self._skip_ws(also=";" if self.calls else "")
                if ch == "{":
                    try:
                        yield from self._call(ch)
                        continue
                    except _NotACall:
                        pass
                else:
                    self._unread(ch)
                self._give_back()
            yield from self._until("<|python_tag|>")
            try:
                yield from self._call((yield from self._skip_ws()))
                bare = True
            except _NotACall:
                self._give_back()
                bare = False

    def _generic(self) -> Reader:
        """{"response": "..."} streams its text as content, {"tool_calls": [...]} its calls;
        anything else is content."""
        ch = yield from self._skip_ws()
        answered = False
        if ch == "{":
            try:
                yield from self._generic_object()
                answered = True
            except _NotACall:
                self._listing = False
                self._give_back()
        else:
            self._unread(ch)
            self._give_back()
        if answered:  # whitespace after the answer object is dropped
            self._raw.clear()
            self._unread((yield from self._skip_ws()))
        yield from self._until(None)

    def _generic_object(self) -> Reader:
        try:
            key = yield from self._key()
            if key == "response":
                if (yield from self._skip_ws()) != '"':
                    raise _Deviation
                self._produced = True
                yield from self._string(self._content)
            elif key == "tool_calls":
                if (yield from self._skip_ws()) != "[":
                    raise _Deviation
                self._listing = True  # left set when the end cuts the list: `_main` reads it
                ch = yield from self._skip_ws()
                while ch != "]":
                    yield from self._call(ch)
                    ch = yield from self._skip_ws()
                    if ch == ",":
                        ch = yield from self._skip_ws()
                    elif ch != "]":
                        raise _NotACall
                self._listing = False
            else:
                raise _Deviation
        except _Deviation:
            if self._produced:
                raise _NotACall from None
            yield from self._whole_answer()
            return
        if (yield from self._skip_ws()) != "}":
            raise _NotACall
        self._raw.clear()

    def _whole_answer(self) -> Reader:
        """The answer object in another shape than streamed: {"response": ...} or
        {"tool_calls": [...]} with keys in any order, or llama.cpp's {"tool_call": {...}}."""
        scan = _Scan()
        for ch in self._raw:
            scan.push(ch)
        while not scan.done:
            scan.push((yield from self._next()))
        try:
            value = json.loads("".join(self._raw))
        except ValueError:
            raise _NotACall from None
        if isinstance(value, dict) and isinstance(value.get("response"), str):
            self._content.append(value["response"])
            self._raw.clear()
            self._produced = True
            return
        listed = value.get("tool_calls", [value.get("tool_call")]) if isinstance(value, dict) else None
        calls = [self._parse_call(c) for c in listed] if isinstance(listed, list) else [None]
        if not calls or None in calls:
            raise _NotACall
        for call in calls:
            self._emit_call(call)


def call_id(short: bool = False) -> str:
    """A new call id: "call_" and 24 letters or digits, or 9 alone (Mistral's templates refuse
    any other shape)."""
    if short:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def fresh_call_id(like: str) -> str:
    """A new id of the same shape as `like`, for an answer replayed from the cache."""
    return call_id(short=not like.startswith("call_"))


def new_parser(fmt: ToolFormat, tools: Sequence[Tool]) -> ToolCallParser:
    """A parser for one answer's output; only calls of `tools` count as calls."""
    return ToolCallParser(fmt, tools)
