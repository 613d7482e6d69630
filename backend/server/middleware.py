"""What every request passes through, whatever its dialect: request ids, the body limit, the
access log line, auth, reading a JSON body, and every error as a JSON body.

Bad input never becomes a 500: bodies are parsed by hand into strict pydantic models, and each
failure is a 400 naming the field; anything unexpected becomes a generic 500 (logged with its
traceback) and the process keeps serving.

Error bodies take the shape of the dialect that owns the request's path (`ErrorShapes`): the
route table maps path prefixes to error-body functions, so a dialect whose clients expect
another shape brings its own without any change here.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import FastAPI, Header, Request
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BadRequest, CorralError, QueueFull, Unauthorized
from ..metrics import Metrics

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("corral.server")

MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context; stops memory abuse
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # ids are echoed in headers and logs
_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}

ErrorBody = Callable[[str, str, str | None], dict[str, Any]]  # (code, message, request id) → JSON body
B = TypeVar("B", bound=BaseModel)


def state_of(request: Request) -> ServerState:
    return request.app.state.corral


def ids(request: Request) -> tuple[str, str | None]:
    """The request id (the client's X-Request-Id or a new one) and the client's X-Session-Id."""
    return request.scope["corral.request_id"], request.scope.get("corral.session_id")


class ErrorShapes:
    """The error body of each request, by the longest path prefix the route table names
    (`""`, which every path has, must be among them)."""

    def __init__(self, bodies: Mapping[str, ErrorBody]) -> None:
        self._bodies = sorted(bodies.items(), key=lambda item: len(item[0]), reverse=True)

    def response(self, scope: Scope, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> JSONResponse:
        path = scope.get("path", "")
        body = next(body for prefix, body in self._bodies if path.startswith(prefix))
        return JSONResponse(body(code, message, scope.get("corral.request_id")), status_code=status, headers=headers)


# -- the request context -------------------------------------------------------------------------


class _BodyTooLarge(FastAPIHTTPException):
    """Raised while the body streams in; FastAPI re-raises HTTPExceptions from body reading."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class RequestContext:
    """Pure ASGI middleware: request ids, body limit, the per-request log line, and a last-resort
    500 that never carries a traceback.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through untouched and a
    client's disconnect still reaches the route."""

    def __init__(self, app: ASGIApp, metrics: Metrics, errors: ErrorShapes, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.errors = errors
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        bad = [name for name in ("x-request-id", "x-session-id")
               if headers.get(name) is not None and not _ID_PATTERN.fullmatch(headers[name])]
        request_id = uuid.uuid4().hex if bad or not headers.get("x-request-id") else headers["x-request-id"]
        session_id = None if bad else headers.get("x-session-id")
        scope["corral.request_id"], scope["corral.session_id"] = request_id, session_id
        echo = [(b"x-request-id", request_id.encode())]
        if session_id:
            echo.append((b"x-session-id", session_id.encode()))
        status: int | None = None
        started = time.perf_counter()

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *echo]}
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        try:
            declared = headers.get("content-length")
            if bad:  # an id we would silently replace would break the caller's tracing: say so
                scope["corral.error"] = "bad id header"
                response = self.errors.response(scope, 400, "invalid_request", f"header {bad[0]}: must be 1-128 "
                                                "letters, digits or . _ : - characters")
                await response(scope, receive, send_with_ids)
            elif declared is not None and re.fullmatch(r"[0-9]{1,18}", declared) and int(declared) > self.max_body:
                scope["corral.error"] = "body too large"
                response = self.errors.response(scope, 413, "request_too_large",
                                                f"request body is larger than {self.max_body} bytes")
                await response(scope, receive, send_with_ids)
            else:
                await self.app(scope, receive_limited, send_with_ids)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if status is None:  # nothing sent yet: answer with a generic 500
                response = self.errors.response(scope, 500, "internal_error", "internal server error; the server "
                                                f"log has the details under request id {request_id}")
                await response(scope, receive, send_with_ids)
        finally:
            self._account(scope, status or 500, time.perf_counter() - started)

    def _account(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "(unmatched)"
        self.metrics.http(scope.get("method", "?"), template, status)
        model = scope.get("corral.model")
        error = scope.get("corral.error")
        log.info("%s %s %d %.3fs request_id=%s%s%s%s", scope.get("method"), scope.get("path"), status, seconds,
                 scope["corral.request_id"],
                 f" session_id={scope['corral.session_id']}" if scope.get("corral.session_id") else "",
                 f" model={model}" if model else "", f" error={error!r}" if error else "")


# -- auth ----------------------------------------------------------------------------------------


def require_key(api_key: str | None) -> Callable[..., Awaitable[None]]:
    """The dependency of every route but /health: `Authorization: Bearer <api_key>`, or
    `x-api-key: <api_key>` as Anthropic's clients send it, compared in constant time (none
    needed when there is no key)."""

    async def check(authorization: Annotated[str | None, Header()] = None,
                    x_api_key: Annotated[str | None, Header()] = None) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        sent = [token.strip() if scheme.lower() == "bearer" else None, x_api_key]
        if not any(key is not None and hmac.compare_digest(key.strip().encode(), api_key.encode()) for key in sent):
            raise Unauthorized("missing or wrong API key; send the header 'Authorization: Bearer <key>'")

    return check


# -- bodies --------------------------------------------------------------------------------------


async def read_json(request: Request, model: type[B]) -> B:
    """The JSON body as `model`, whatever Content-Type says (`curl -d` sends a form type), with
    every failure a 400 that names the field."""
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("request body is required: a JSON object")
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # JSON is UTF-8 (RFC 8259); json.loads would guess
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise BadRequest(f"request body has a value JSON parsing refused: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    _reject_surrogates(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # located in the body as FastAPI's errors are, so a field named "query" (rerank's) stays a field
        raise BadRequest(describe_validation({**err, "loc": ("body", *err["loc"])} for err in exc.errors())) from None


def _reject_surrogates(value: Any, where: str = "body") -> None:
    """JSON can spell lone UTF-16 surrogates ("\\ud800") that no UTF-8 text can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{where}: contains a lone surrogate (\\ud800-\\udfff), which is not text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_surrogates(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_surrogates(item, f"{where}[{i}]")


def describe_validation(errors: Iterable[Any]) -> str:
    """Pydantic's errors as one line a person can act on, each naming its field."""
    parts: list[str] = []
    for err in list(errors)[:5]:
        loc = list(err.get("loc", ()))
        where = loc.pop(0) if loc and loc[0] in ("body", "query", "header", "path") else "body"
        name = ""
        for item in loc:
            name += f"[{item}]" if isinstance(item, int) else (f".{item}" if name else str(item))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not name:
            parts.append(f"request: {msg}")
            continue
        if where != "body":
            name = f"{where} parameter {name!r}"
        given = err.get("input")
        shown = "" if err.get("type") == "missing" or isinstance(given, (dict, list)) else f" (got {given!r:.60})"
        parts.append(f"{name}: {msg}{shown}")
    return "; ".join(parts) or "invalid request"


# -- error handlers ------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI, errors: ErrorShapes) -> None:
    async def corral_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CorralError)
        request.scope["corral.error"] = exc.message
        headers: dict[str, str] = {}
        if isinstance(exc, QueueFull):
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, Unauthorized):
            headers["www-authenticate"] = "Bearer"
        if exc.http_status >= 500:
            log.error("request %s: %s: %s", request.scope.get("corral.request_id"), exc.code, exc.message)
        return errors.response(request.scope, exc.http_status, exc.code, exc.message, headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message = describe_validation(exc.errors())
        request.scope["corral.error"] = message
        return errors.response(request.scope, 400, "invalid_request", message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return errors.response(request.scope, exc.status_code, code, message, dict(exc.headers or {}))

    app.add_exception_handler(CorralError, corral_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
