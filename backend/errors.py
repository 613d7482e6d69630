"""Typed errors of the backend.

Every failure a person can meet carries a message that names the thing (model, file,
numbers) and says what to do, so the console, the HTTP API and a notebook can show it
as-is. `http_status` lets the server map errors without a table of its own.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error the backend raises on purpose."""

    http_status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def about(self, subject: str) -> CorralError:
        """The same error of the same type with its message led by `subject` (such as
        "model 'x'"), for an error raised where the subject was not known; itself where its
        message starts so already."""
        if self.message.startswith(subject):
            return self
        named = type(self).__new__(type(self))  # not __init__: some take more than a message
        named.__dict__.update(self.__dict__)
        named.message = f"{subject}: {self.message}"
        named.args = (named.message,)
        return named


class ConfigError(CorralError):
    """The configuration is invalid; the message names the key, the value and the rule."""

    http_status = 400
    code = "invalid_config"


class NotFound(CorralError):
    """Something named in a request does not exist (a config version, ...)."""

    http_status = 404
    code = "not_found"


class ModelNotFound(CorralError):
    """A model name that the catalog does not know."""

    http_status = 404
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"unknown model {name!r}; known models: {listing}. "
            "Add a [[models]] entry or a GGUF file in a model directory."
        )
        self.name = name
        self.known = sorted(known)


class ModelFileError(CorralError):
    """A model file that is missing, unreadable, not GGUF, or corrupt."""

    http_status = 422
    code = "model_file_invalid"

    def __init__(self, path: str, reason: str, model: str | None = None) -> None:
        who = f"model {model!r}: " if model else ""
        super().__init__(f"{who}{path}: {reason}")
        self.path = path
        self.reason = reason
        self.model = model


class ModelUnusable(CorralError):
    """The catalog lists the model but it cannot be loaded (the reason is known upfront)."""

    http_status = 422
    code = "model_unusable"


class LoadFailed(CorralError):
    """llama.cpp refused to load a model; the message carries its own error lines."""

    http_status = 500
    code = "load_failed"


class FileRejected(LoadFailed):
    """llama.cpp refused the file itself while loading its tensors (one missing, of the wrong
    shape or type), though its header read well: the file's fault, not the server's, so 422
    like any other bad file. A LoadFailed still, so a GPU's out-of-memory lines among its
    reasons are told apart where a load is retried (admission.py)."""

    http_status = 422
    code = "model_file_rejected"


class BudgetExceeded(CorralError):
    """A load that cannot fit even after evicting every idle, unpinned model."""

    http_status = 507
    code = "insufficient_memory"

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


class IllegalTransition(CorralError):
    """A lifecycle change that the state machine does not allow (a bug, never user input)."""

    code = "illegal_transition"


class ModelBusy(CorralError):
    """An operation that needs an idle model timed out while requests were still running."""

    http_status = 409
    code = "model_busy"


class ModelPinned(CorralError):
    """An evict of a pinned model without force."""

    http_status = 409
    code = "model_pinned"


class QueueFull(CorralError):
    """The model's request queue is at its bound; retry after `retry_after` seconds."""

    http_status = 429
    code = "queue_full"

    def __init__(self, model: str, depth: int, retry_after: float = 1.0) -> None:
        super().__init__(
            f"model {model!r}: queue is full ({depth} waiting); retry after {retry_after:.0f} s"
        )
        self.model = model
        self.depth = depth
        self.retry_after = retry_after


class BadRequest(CorralError):
    """A request whose parameters are out of range or inconsistent."""

    http_status = 400
    code = "invalid_request"


class NotSupported(CorralError):
    """A route a client's API has that corral does not serve; the message says what to use."""

    http_status = 501
    code = "not_supported"


class Cancelled(CorralError):
    """A request that was cancelled (client left, stop pressed, or shutdown)."""

    http_status = 499
    code = "cancelled"


class Unauthorized(CorralError):
    """A request without the server's API key (when one is set)."""

    http_status = 401
    code = "unauthorized"


class ShuttingDown(CorralError):
    """A generation that arrived after shutdown began; another replica (or a restart) can take it."""

    http_status = 503
    code = "shutting_down"


class GenerationFailed(CorralError):
    """The engine ended a non-streaming request with an error (streams carry it in their last chunk)."""

    http_status = 500
    code = "generation_failed"


class ServerUnreachable(CorralError):
    """A remote backend that cannot reach its corral server."""

    http_status = 503
    code = "server_unreachable"


class PullError(CorralError):
    """A pull that could not finish: the host, the transfer or the file was wrong. The message
    says what happened and whether running the pull again resumes it."""

    http_status = 502
    code = "pull_failed"


class PullSourceInvalid(PullError):
    """A pull source corral cannot read (a name in ollama's library, a URL of no .gguf file,
    a quantization that matches several files)."""

    http_status = 400
    code = "pull_source_invalid"


class PullNotFound(PullError):
    """The host has no such file, repository or quantization."""

    http_status = 404
    code = "pull_not_found"


class PullForbidden(PullError):
    """The host refused the download (401/403): a gated or private repository."""

    http_status = 403
    code = "pull_forbidden"


class InsufficientDisk(PullError):
    """Not enough free space for the download where it is written; the numbers are in the message."""

    http_status = 507
    code = "insufficient_storage"

    def __init__(self, message: str, needed: int, free: int, path: str) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.path = path


class PullInProgress(PullError):
    """A pull that would write where another pull is writing, or join it with other options."""

    http_status = 409
    code = "pull_in_progress"


class ModelNameTaken(CorralError):
    """A pull whose model name is already used by another model (`--name` picks another)."""

    http_status = 409
    code = "model_name_taken"


class NotPulled(CorralError):
    """`rm` of a model whose files corral did not download: they belong to someone else."""

    http_status = 409
    code = "not_pulled"
