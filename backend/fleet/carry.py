"""A node's CorralError across Ray. Ray pickles what a replica raises, and corral's errors take
their own constructor arguments (a model name, a queue depth), which unpickling by message
alone cannot call; so the node sends the class, the message and the attributes, and the caller
raises the same error again (the same HTTP status, code and Retry-After)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from ..errors import CorralError


class CarriedError(Exception):
    def __init__(self, module: str, name: str, message: str, state: dict[str, Any]) -> None:
        super().__init__(module, name, message, state)
        self.module, self.name, self.message, self.state = module, name, message, state

    def restored(self) -> CorralError:
        cls = getattr(importlib.import_module(self.module), self.name, None)
        if not (isinstance(cls, type) and issubclass(cls, CorralError)):
            cls = CorralError
        error = cls.__new__(cls)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.state)
        return error


@contextlib.contextmanager
def carried() -> Iterator[None]:
    """Raise a CorralError from the block as a CarriedError."""
    try:
        yield
    except CorralError as exc:
        raise CarriedError(type(exc).__module__, type(exc).__qualname__, exc.message, dict(vars(exc))) from None


def restored(exc: BaseException) -> BaseException:
    """What a node raised, as it raised it: Ray's wrapper around a CarriedError gives way to the
    original error; anything else stays as it is."""
    cause = getattr(exc, "cause", None)
    return cause.restored() if isinstance(cause, CarriedError) else exc
