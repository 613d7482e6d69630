"""How the console words a failure for the operator."""

from __future__ import annotations

from corral.backend.errors import CorralError


def describe_error(error: BaseException) -> str:
    """The message to show for `error`: corral's errors are written for people as they are;
    anything else gets its type name in front."""
    text = str(error).strip()
    if text and isinstance(error, CorralError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
