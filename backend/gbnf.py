"""Pieces of GBNF text: literals, characters, repetition and decimal integer ranges, written
the way llama.cpp's grammar parser reads them."""

from __future__ import annotations

MAX_DIGITS = 16  # integers in a grammar have at most this many digits


def literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    return '"' + "".join(char(c) for c in text) + '"'


def char(c: str, in_class: bool = False) -> str:
    """One character as GBNF writes it in a literal (or, with in_class, in a [...] class)."""
    if c.isascii() and (c.isalnum() or c in " _.,:;!?#$%&'()*+/<=>@`{|}~" or (c in "-[]^" and not in_class)):
        return c
    if c in '"\\' and not in_class:
        return "\\" + c
    code = ord(c)
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def repeat(expr: str, low: int, high: int | None) -> str:
    """`expr` between low and high times (None: no upper bound), as GBNF."""
    if high == 0:
        return ""
    if (low, high) == (0, 1):
        return f"( {expr} )?"
    if high is None:
        return f"( {expr} )*" if low == 0 else f"( {expr} )+" if low == 1 else f"( {expr} ){{{low},}}"
    return f"( {expr} ){{{low},{high}}}" if low != high else f"( {expr} ){{{low}}}"


def integer_range(low: int | None, high: int | None) -> str:
    """Decimal integers in [low, high] (None: up to MAX_DIGITS digits), no leading zeros, no -0."""
    alternatives = []
    if low is None or low < 0:
        magnitudes = (1 if high is None or high >= 0 else -high, None if low is None else -low)
        alternatives.append(f'"-" {_natural_range(*magnitudes)}')
    if high is None or high >= 0:
        alternatives.append(_natural_range(0 if low is None else max(low, 0), high))
    return "( " + " | ".join(alternatives) + " )"


def _natural_range(low: int, high: int | None) -> str:
    high = 10 ** MAX_DIGITS - 1 if high is None else high
    spans = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        a, b = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(high, 10 ** digits - 1)
        if a <= b:
            spans.append(_same_length(str(a), str(b)))
    return "( " + " | ".join(spans) + " )"


def _same_length(low: str, high: str) -> str:
    """Digit strings of one length between low and high."""
    if low == high:
        return literal(low)
    rest = len(low) - 1
    tail = f" [0-9]{{{rest}}}" if rest else ""
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return f"[{low[0]}-{high[0]}]{tail}"
    if low[0] == high[0]:
        return f"{literal(low[0])} {_same_length(low[1:], high[1:])}"
    parts = [f"{literal(low[0])} {_same_length(low[1:], '9' * rest)}"]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]{tail}")
    parts.append(f"{literal(high[0])} {_same_length('0' * rest, high[1:])}")
    return "( " + " | ".join(parts) + " )"
