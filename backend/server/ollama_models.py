"""ollama's model-file routes over corral's pull and rm: `/api/pull` and `/api/delete`.

ollama's clients pull Hugging Face GGUFs as `hf.co/owner/repo:QUANT`; corral takes that, an
hf:// source or a URL. A name from ollama's own library (`llama3.2`) is an `{"error": ...}`
saying what to use instead: ollama's registry serves its own blob format, not GGUF files.
The stream is NDJSON (`"stream": false`: one object once the pull is done):
`pulling manifest` while the source is resolved, `pulling <digest>` with `digest`, `total` and
`completed` while bytes arrive, `verifying sha256 digest`, then `success`; a failure is a last
line `{"error": ...}`, which ollama's clients raise. `/api/delete` deletes only a model corral
pulled, as `corral rm` does; anything else is a 409 saying whose file it is.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from ..errors import BadRequest, CorralError
from ..pull.status import DONE, DOWNLOADING, RESOLVING, PullStatus
from .middleware import ids, read_json, state_of
from .ollama import MEDIA_TYPE, ShowRequest, line
from .streams import ClosingStream

log = logging.getLogger("corral.server")


class PullRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = Field(None, min_length=1, max_length=4096)
    name: str | None = Field(None, min_length=1, max_length=4096)  # the older field
    insecure: bool = False
    stream: bool = True

    @property
    def source(self) -> str:
        given = self.model or self.name
        if given is None:
            raise BadRequest("model is required: hf.co/owner/repo:QUANT, hf://owner/repo/file.gguf or a URL of a "
                             ".gguf file")
        return given


def progress(status: PullStatus) -> dict[str, Any]:
    """ollama's progress object for one of corral's pull statuses."""
    if status.status == RESOLVING:
        return {"status": "pulling manifest"}
    if status.status == DOWNLOADING:
        digest = f"sha256:{status.sha256}" if status.sha256 else status.file or status.source
        shown = status.sha256[:12] if status.sha256 else status.file
        return {"status": f"pulling {shown}", "digest": digest, "total": status.total or 0,
                "completed": status.completed}
    if status.status == DONE:
        return {"status": "success"}
    return {"status": "verifying sha256 digest"}


async def pull(request: Request) -> Response:
    body = await read_json(request, PullRequest)
    state = state_of(request)
    state.check_accepting()
    flight = state.flight()
    statuses = state.backend.pull(body.source)
    try:
        last = first = await anext(statuses)
        if not body.stream:
            async for last in statuses:
                pass
    except BaseException:
        await flight.close(statuses)
        raise
    if not body.stream:
        await flight.close(statuses)
        return JSONResponse(progress(last))
    return ClosingStream(_lines(first, statuses, ids(request)[0]), on_close=lambda: flight.close(statuses),
                         media_type=MEDIA_TYPE)


async def _lines(first: PullStatus, statuses: AsyncIterator[PullStatus], request_id: str) -> AsyncGenerator[str, None]:
    status: PullStatus | None = first
    shown: dict[str, Any] | None = None
    try:
        while status is not None:
            piece = progress(status)
            if piece != shown:
                shown = piece
                yield line(piece)
            status = await anext(statuses, None)
    except CorralError as exc:
        yield line({"error": exc.message})
    except Exception:
        log.exception("ollama pull %s failed", request_id)
        yield line({"error": f"internal error (request {request_id}); see the server log"})


async def delete(request: Request) -> Response:
    body = await read_json(request, ShowRequest)  # the same `model` (or older `name`) as /api/show
    await state_of(request).backend.remove(body.target)
    return Response(status_code=200)
