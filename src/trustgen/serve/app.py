"""An OpenAI-compatible HTTP server for trained runs, with trustgen's own detect/verify routes.

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/images/generations` in the
OpenAI shape (so the official clients work unchanged); `/v1/audio/generations` (music runs: WAV,
MIDI and piano roll, watermarked and signed); `/v1/detect`, `/v1/verify`, `/health`,
Prometheus `/metrics`; the playground page at `/`. Every text model has its own continuous-
batching scheduler (trustgen.serve.batching). Text is watermarked with the keystore's key by
default and every response carries what a manifest would say (model id, watermark scheme and key
id, never a key) in the extension field `trustgen`.

Security: with API keys configured, every route but `/health` and the page itself (static, no
data; it asks for a key) needs `Authorization: Bearer KEY`. Keys are kept as SHA-256 hashes and
compared in constant time; each key has its own rate limit. Prompts, outputs and keys are never
logged. The server binds to 127.0.0.1 unless told otherwise (see `serve`).

The package's modules: this one builds the app (lifespan, error handlers, routers); `schemas`
(request bodies, errors), `auth` (API keys, rate limit, body size), `metrics`, `state` (what the
routes share through `app.state.server`), and the routes: `text`, `images`, `audio`, `trust` (detect,
verify), `models` (health, model list, metrics), `playground`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from trustgen.errors import TrustgenError
from trustgen.safety.trust import Keys
from trustgen.serve import audio, images, models, playground, text, trust
from trustgen.serve.auth import Guard, RateLimiter, hash_key, read_api_keys
from trustgen.serve.metrics import Metrics, step_recorder
from trustgen.serve.schemas import APIError, error_response, validation_message
from trustgen.serve.state import ServerState, SharedChains, load_models
from trustgen.serve.text import chat_prompt

# What callers import from here (the tests, `trustgen serve`, the benchmarks).
__all__ = ["RateLimiter", "SharedChains", "chat_prompt", "create_app", "hash_key", "read_api_keys", "running",
           "server_config"]

STREAM_INTERVAL = 0.02  # seconds; what a stream generates meanwhile goes out as one chunk
log = logging.getLogger("trustgen.serve")


def create_app(runs: Sequence[Path], *, api_keys: Iterable[str] = (), keystore: Path | None = None,
               max_batch: int = 16, max_queue: int = 64, rate_limit: float = 600.0,
               stream_interval: float = STREAM_INTERVAL) -> FastAPI:
    """The server for these runs. `api_keys` are SHA-256 hashes (see read_api_keys);
    `stream_interval`: seconds between two chunks of a stream after its first token."""
    if not 0 <= stream_interval <= 1:
        raise TrustgenError(f"the stream interval must lie in 0..1 seconds, got {stream_interval}.")
    keys = Keys(keystore, announce=None)
    keys.store()  # the keys exist before the first request
    state = ServerState(models=load_models(runs, keys, max_batch, max_queue), keys=keys, metrics=Metrics(),
                        chains=SharedChains(), stream_interval=stream_interval)

    app = FastAPI(title="trustgen", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.models = state.models
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(TrustgenError, _user_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(Guard, key_hashes=list(api_keys), limiter=RateLimiter(rate_limit), metrics=state.metrics)
    app.add_middleware(ErrorBoundary)  # added last: outermost, so it sees what every other layer let through
    for routes in (models, text, images, audio, trust, playground):
        app.include_router(routes.router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run each text model's decode loop while the server runs."""
    state: ServerState = app.state.server
    loops = []
    for entry in state.models.values():
        if entry.scheduler is not None:
            entry.scheduler.on_step = step_recorder(state.metrics, entry.name)
            entry.scheduler.on_tokens = state.metrics.tokens.labels(entry.name).inc
            loops.append(asyncio.create_task(entry.scheduler.run(), name=f"decode {entry.name}"))
    yield
    for entry in state.models.values():
        if entry.scheduler is not None:
            entry.scheduler.stop()
    await asyncio.gather(*loops)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _user_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    if isinstance(first.get("input"), bytes):  # FastAPI reads JSON only when the request says it is JSON
        return error_response(415, "send the request body as JSON, with the header Content-Type: application/json.",
                              "body", "unsupported_media_type")
    param, message = validation_message(first)
    return error_response(400, message, param, "invalid_json" if first.get("type") == "json_invalid" else None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in the OpenAI shape."""
    assert isinstance(exc, HTTPException)
    path = request.url.path[:200]
    if exc.status_code == 404:
        return error_response(404, f"there is no route {request.method} {path}; the API lives under /v1 "
                                   "(GET /v1/models lists the models).", code="not_found")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error_response(405, f"{request.method} is not allowed on {path}; use {allowed or 'another method'}.",
                              code="method_not_allowed", headers=exc.headers)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


class ErrorBoundary:
    """The last line: an exception no handler took becomes a 500 in the OpenAI shape, and the log
    gets its type and the line that raised it, never its message or traceback text, which may
    hold a prompt (a validation error's text carries the whole request body)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # every failure must end in a clean answer
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("internal error on %s %s: %s at %s:%s", scope["method"], scope["path"][:200],
                      type(exc).__name__, Path(where.filename).name, where.lineno)
            if not started:  # a stream already under way can only be cut short
                response = error_response(500, "the server failed on this request (its log says where); retry, "
                                               "or report it.", code="internal_error")
                await response(scope, receive, send)


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """How uvicorn runs the app: warnings only and no access log, so no request is ever logged."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the app from a background thread (port 0: any free port); yields its base URL.
    For tests, notebooks and benchmarks; `trustgen serve` runs in the foreground instead."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port))
    thread = threading.Thread(target=server.run, name="trustgen-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise TrustgenError(f"the server did not start on {host}:{port}.")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
