"""An OpenAI-compatible HTTP server for trained runs, with trustgen's own detect/verify routes.

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/images/generations` in the
OpenAI shape (so the official clients work unchanged); `/v1/detect`, `/v1/verify`, `/health`,
Prometheus `/metrics`; the playground page at `/`. Every text model has its own continuous-
batching scheduler (trustgen.serve.batching). Text is watermarked with the keystore's key by
default and every response carries what a manifest would say (model id, watermark scheme and key
id, never a key) in the extension field `trustgen`.

Security: with API keys configured, every route but `/health` and the page itself (static, no
data; it asks for a key) needs `Authorization: Bearer KEY`. Keys are kept as SHA-256 hashes and
compared in constant time; each key has its own rate limit. Prompts, outputs and keys are never
logged. The server binds to 127.0.0.1 unless told otherwise (see `serve`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trustgen import api
from trustgen.errors import TrustgenError
from trustgen.io import file_sha256
from trustgen.safety.keys import Keystore
from trustgen.sample.processors import build_chain
from trustgen.serve.batching import BeyondContext, Finished, Generation, QueueFull, Scheduler, Token

MAX_BODY_BYTES = 16 << 20  # images and files to verify arrive base64-encoded in JSON
CHAT_STOP = "\n\n"  # a reply ends where the template starts the next speaker
DEFAULT_TOKENS = 16  # max_tokens when a completion request gives none (OpenAI's default)
DEFAULT_CHAT_TOKENS = 256  # ... and a chat request, within the context
RETRY_AFTER_SECONDS = 1
STREAM_INTERVAL = 0.02  # seconds; what a stream generates meanwhile goes out as one chunk
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


# -- request bodies ------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # trustgen extension, as in vLLM
    min_p: float | None = Field(None, gt=0, le=1)  # trustgen extension
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    watermark: Literal["kgw", "kgw-selfhash", "gumbel", "none"] | None = None  # trustgen extension; default kgw

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops


class CompletionBody(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


class ImageBody(_Body):
    model: str
    prompt: str = ""
    n: int = Field(1, ge=1, le=16)
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(None, ge=0, lt=2**63)
    size: str | None = None


class DetectBody(_Body):
    text: str | None = None
    image: str | None = None  # base64


class VerifyBody(_Body):
    filename: str = Field(min_length=1, max_length=200)
    content: str  # base64 of the file
    manifest: str | None = None  # a text file's sidecar FILE.manifest.json, as text


# -- errors in the OpenAI shape -------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _validation_message(error: dict[str, Any]) -> tuple[str, str]:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    got = error.get("input")
    shown = "" if got is None or isinstance(got, dict) else f" (got {json.dumps(got)[:80]})"
    return where, f"{where}: {error.get('msg', 'invalid value')}{shown}"


# -- what the server holds -----------------------------------------------------------------------

@dataclass
class ServedModel:
    name: str
    run_dir: Path
    model: Any  # api.TextModel or api.ImageModel
    model_id: str  # SHA-256 of the weights
    scheduler: Scheduler | None = None
    tokenizer_sha: str | None = None

    @property
    def is_text(self) -> bool:
        return self.scheduler is not None


@dataclass
class RateLimiter:
    """A token bucket per API key: `per_minute` requests a minute, bursts up to that many."""

    per_minute: float
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key hash -> (tokens, time)

    def allow(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds to wait."""
        now = time.monotonic()
        burst = max(1.0, self.per_minute)  # below one a minute, the bucket must still hold a request
        tokens, then = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - then) * self.per_minute / 60)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return (1 - tokens) * 60 / self.per_minute
        self.buckets[key] = (tokens - 1, now)
        return 0.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_api_keys(path: Path) -> list[str]:
    """Hashes of the keys in a file (one per line; blank lines and # comments skipped). A line
    that is already `sha256:HEX` is taken as a hash, so the file need not hold plain keys."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrustgenError(f"cannot read the API key file {path} ({exc.strerror}).") from None
    hashes = []
    for number, line in enumerate((raw.strip() for raw in lines), start=1):
        if not line or line.startswith("#"):
            continue
        if not line.startswith("sha256:"):
            hashes.append(hash_key(line))
            continue
        digest = line.removeprefix("sha256:").lower()
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            # The line is not shown: it may be a key typed where its hash belongs.
            raise TrustgenError(f"line {number} of the API key file {path} starts with sha256: but is not "
                                "followed by 64 hexadecimal digits.")
        hashes.append(digest)
    if not hashes:
        raise TrustgenError(f"the API key file {path} holds no key.")
    return hashes


class SharedChains:
    """One processor chain per distinct sampling setting (seed, length and stop strings aside),
    shared by every request that asks for it, so that the scheduler can run those requests'
    processors as one batch."""

    LIMIT = 256  # distinct settings kept; past it the oldest is forgotten

    def __init__(self) -> None:
        self.chains: dict[tuple[str, Any, str], list[Any]] = {}

    def get(self, model: str, config: Any, scheme: str, build: Any) -> list[Any]:
        # What the processors depend on: the model (its vocabulary), the settings, the scheme.
        key = (model, replace(config, seed=None, max_new_tokens=1, stop=()), scheme)
        if key not in self.chains:
            if len(self.chains) >= self.LIMIT:
                self.chains.pop(next(iter(self.chains)))
            self.chains[key] = build()
        return self.chains[key]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue = Gauge("trustgen_queue_length", "Requests waiting for a place in the batch",
                           ["model"], registry=self.registry)
        self.running = Gauge("trustgen_running_sequences", "Sequences being decoded", ["model"], registry=self.registry)
        self.tokens = Counter("trustgen_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.tokens_per_second = Gauge("trustgen_tokens_per_second", "Tokens per second over the last decode step",
                                       ["model"], registry=self.registry)
        self.latency = Histogram("trustgen_request_seconds", "Time from request to its last token",
                                 ["route"], registry=self.registry)
        self.first_token = Histogram("trustgen_time_to_first_token_seconds", "Time from request to first token",
                                     ["model"], registry=self.registry)
        self.rejected = Counter("trustgen_rejected_requests", "Requests refused (queue full or rate limited)",
                                ["reason"], registry=self.registry)


# -- the app -------------------------------------------------------------------------------------

def load_models(runs: Sequence[Path], store: Keystore, max_batch: int, max_queue: int) -> dict[str, ServedModel]:
    from trustgen.safety.authenticity import remember_tokenizer

    served: dict[str, ServedModel] = {}
    for run in runs:
        run = Path(run)
        name = run.resolve().name
        if name in served:
            raise TrustgenError(f"two runs are both named {name!r}; serve runs with different folder names.")
        model = api.load(run)
        entry = ServedModel(name, run, model, file_sha256(run / "model.safetensors"))
        if isinstance(model, api.TextModel):
            entry.scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue)
            entry.tokenizer_sha = remember_tokenizer(store, run / "tokenizer.json")  # so /v1/detect knows it
        served[name] = entry
    return served


def create_app(runs: Sequence[Path], *, api_keys: Iterable[str] = (), keystore: Path | None = None,
               max_batch: int = 16, max_queue: int = 64, rate_limit: float = 600.0,
               stream_interval: float = STREAM_INTERVAL) -> FastAPI:
    """The server for these runs. `api_keys` are SHA-256 hashes (see read_api_keys);
    `stream_interval`: seconds between two chunks of a stream after its first token."""
    if not 0 <= stream_interval <= 1:
        raise TrustgenError(f"the stream interval must lie in 0..1 seconds, got {stream_interval}.")
    store = Keystore(keystore)
    if not (store.has_watermark_key() and store.has_signing_identity()):
        store.init()
    models = load_models(runs, store, max_batch, max_queue)
    key_hashes = list(api_keys)
    limiter = RateLimiter(rate_limit)
    metrics = Metrics()
    watermark_key = store.watermark_key()
    chains = SharedChains()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loops = []
        for entry in models.values():
            if entry.scheduler is not None:
                entry.scheduler.on_step = _step_recorder(metrics, entry.name)
                entry.scheduler.on_tokens = metrics.tokens.labels(entry.name).inc
                loops.append(asyncio.create_task(entry.scheduler.run(), name=f"decode {entry.name}"))
        yield
        for entry in models.values():
            if entry.scheduler is not None:
                entry.scheduler.stop()
        await asyncio.gather(*loops)

    app = FastAPI(title="trustgen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(TrustgenError)
    async def _user_error(request: Request, exc: TrustgenError) -> JSONResponse:
        return _error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _validation_message(exc.errors()[0])
        return _error_response(400, message, param)

    app.add_middleware(Guard, key_hashes=key_hashes, limiter=limiter, metrics=metrics)

    # -- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        for entry in models.values():
            if entry.scheduler is not None:
                metrics.queue.labels(entry.name).set(entry.scheduler.queue_length)
                metrics.running.labels(entry.name).set(entry.scheduler.running_count)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(entry.run_dir.stat().st_mtime), "owned_by": "trustgen",
             "trustgen": {"kind": "text" if entry.is_text else "image", "model_id": entry.model_id,
                          **_model_details(entry)}}
            for name, entry in models.items()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        entry = _text_model(models, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string (or a list of them).", "prompt")
        return await _generate(entry, body, prompts, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Response:
        entry = _text_model(models, body.model)
        return await _generate(entry, body, [chat_prompt(body.messages)], request, chat=True)

    async def _generate(entry: ServedModel, body: CompletionBody | ChatBody, prompts: list[str], request: Request,
                        chat: bool) -> Response:
        started = time.perf_counter()
        model: api.TextModel = entry.model
        stops = list(body.stop or []) + ([CHAT_STOP] if chat else [])
        settings = {"max_new_tokens": body.max_tokens or 1, "temperature": body.temperature,
                    "top_p": None if body.top_p == 1 else body.top_p, "top_k": body.top_k, "min_p": body.min_p,
                    "stop": tuple(stops)}
        config = api.sample_config({k: v for k, v in settings.items() if v is not None})
        scheme = body.watermark or "kgw"
        top = (body.top_logprobs or 0) if chat and body.logprobs else None if chat else body.logprobs
        inbox = _Inbox(stream_interval if body.stream else math.inf)  # a whole answer needs only the endings
        sequences: list[Generation] = []
        scheduler = entry.scheduler
        if len(prompts) * body.n > scheduler.max_batch + scheduler.max_queue:
            raise APIError(400, f"this request asks for {len(prompts) * body.n} sequences (prompts × n); the server "
                                f"takes at most {scheduler.max_batch + scheduler.max_queue} at once.", "n")
        encoded = [model.encode_prompt(prompt) for prompt in prompts]
        try:
            for p_index, ids in enumerate(encoded):
                # Without max_tokens: OpenAI's defaults (16, or the rest of the context for chat),
                # never past the context.
                room = scheduler.capacity - len(ids)
                length = body.max_tokens or max(1, min(DEFAULT_CHAT_TOKENS if chat else DEFAULT_TOKENS, room))
                for i in range(body.n):
                    choice = p_index * body.n + i
                    seed = None if body.seed is None else (body.seed + choice) % 2**63
                    chain = chains.get(entry.name, config, scheme, lambda: [*build_chain(config), *_watermark(
                        scheme, watermark_key, model)])
                    seq = Generation(ids, replace(config, seed=seed, max_new_tokens=length), chain,
                                     deliver=inbox.deliverer(choice), logprobs=top)
                    entry.scheduler.submit(seq)
                    sequences.append(seq)
        except QueueFull as exc:
            for seq in sequences:
                seq.cancel()
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except TrustgenError as exc:
            for seq in sequences:
                seq.cancel()
            raise APIError(400, str(exc), "max_tokens" if isinstance(exc, BeyondContext) else None) from None
        header = _header(chat, entry.name)
        manifest = _manifest(entry, scheme, watermark_key.key_id)
        route = "chat" if chat else "completions"
        if body.stream:
            options = body.stream_options or {}
            # continuous_usage_stats (as in vLLM): every chunk also carries the counts so far
            usage_stats = "every chunk" if options.get("continuous_usage_stats") else \
                "at the end" if options.get("include_usage") else None
            echoes = [p for p in prompts for _ in range(body.n)] if not chat and body.echo else None
            events = _stream_events(inbox, sequences, header, chat, usage_stats, manifest, entry, metrics, started,
                                    route, request, echoes)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _collect(inbox, sequences, request, chat, entry, metrics, started)
        if not chat and body.echo:  # the prompt in front, as OpenAI's echo does (its tokens get no logprobs)
            for choice in choices:
                choice["text"] = prompts[choice["index"] // body.n] + choice["text"]
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        usage = _usage(sequences)
        return JSONResponse({**header, "choices": choices, "usage": usage, "trustgen": manifest})

    @app.post("/v1/images/generations")
    async def images(body: ImageBody) -> dict[str, Any]:
        entry = models.get(body.model)
        if entry is None or entry.is_text:
            raise APIError(404 if entry is None else 400, f"no image model named {body.model!r}; "
                           f"the image models here are: {', '.join(n for n, e in models.items() if not e.is_text) or 'none'}.",
                           "model")
        size = entry.model.model.config.image_size
        if body.size is not None and body.size != f"{size}x{size}":
            raise APIError(400, f"size: this model makes {size}x{size} images, not {body.size}.", "size")
        pictures = await asyncio.to_thread(_signed_pictures, entry, body, store, watermark_key)
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(p).decode()} for p in pictures],
                "trustgen": {"model_id": entry.model_id, "watermark": {"scheme": "spectral",
                                                                       "key_id": watermark_key.key_id}}}

    @app.post("/v1/detect")
    async def detect(body: DetectBody) -> dict[str, Any]:
        if (body.text is None) == (body.image is None):
            raise APIError(400, "send exactly one of text or image (base64).", "text")
        if body.text is not None:
            if not body.text.strip():
                raise APIError(400, "text is empty.", "text")
            return await asyncio.to_thread(_detect_text, body.text, store)
        return await asyncio.to_thread(_detect_image, _decoded(body.image, "image"), store)

    @app.post("/v1/verify")
    async def verify(body: VerifyBody) -> dict[str, Any]:
        return await asyncio.to_thread(_verify, body, store)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        # As a header (not only the page's meta tag) so that it can forbid framing too.
        return HTMLResponse(_static("playground.html"), headers={"Content-Security-Policy": PAGE_POLICY,
                                                                 "X-Content-Type-Options": "nosniff"})

    @app.get("/playground.js")
    async def playground_script() -> Response:
        return Response(_static("playground.js"), media_type="text/javascript")

    @app.get("/playground.css")
    async def playground_style() -> Response:
        return Response(_static("playground.css"), media_type="text/css")

    return app


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """How uvicorn runs the app: warnings only and no access log, so no request is ever logged."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the app from a background thread (port 0: any free port); yields its base URL.
    For tests, notebooks and benchmarks; `trustgen serve` runs in the foreground instead."""
    import threading

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


class Guard:
    """Body size, API keys and rate limits, before any route runs. A plain ASGI middleware:
    Starlette's `BaseHTTPMiddleware` would pipe every streamed chunk through an extra task."""

    OPEN_PATHS = ("/health", "/", "/playground.js", "/playground.css")

    def __init__(self, app: Any, key_hashes: list[str], limiter: RateLimiter, metrics: Metrics) -> None:
        self.app, self.key_hashes, self.limiter, self.metrics = app, key_hashes, limiter, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is None and "content-length" not in headers and scope["method"] in ("POST", "PUT", "PATCH"):
            receive, refusal = await self._buffered(receive)  # a chunked body: count it before the app sees it
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _too_large()
        if not self.key_hashes or path in self.OPEN_PATHS:
            return None
        header = headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        presented = hash_key(token)
        if not token or not any(hmac.compare_digest(presented, known) for known in self.key_hashes):
            return _error_response(401, "a valid API key is required: send Authorization: Bearer KEY.",
                                   code="invalid_api_key")
        wait = self.limiter.allow(presented)
        if wait > 0:
            self.metrics.rejected.labels("rate_limit").inc()
            return _error_response(429, "too many requests for this API key; slow down.", code="rate_limit",
                                   headers={"Retry-After": str(max(1, round(wait)))})
        return None

    @staticmethod
    async def _buffered(receive: Any) -> tuple[Any, JSONResponse | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return receive, _too_large()
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return replay, None


def _too_large() -> JSONResponse:
    return _error_response(413, f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes.")


def _step_recorder(metrics: Metrics, name: str) -> Any:
    def record(rows: int, seconds: float) -> None:
        metrics.tokens_per_second.labels(name).set(rows / seconds if seconds > 0 else 0.0)
    return record


def _static(name: str) -> str:
    return resources.files("trustgen.serve").joinpath("static", name).read_text(encoding="utf-8")


def _text_model(models: dict[str, ServedModel], name: str) -> ServedModel:
    entry = models.get(name)
    if entry is None:
        raise APIError(404, f"the model {name!r} does not exist; the models here are: {', '.join(models)}.", "model",
                       "model_not_found")
    if not entry.is_text:
        raise APIError(400, f"{name!r} is an image model; use /v1/images/generations.", "model")
    return entry


def _model_details(entry: ServedModel) -> dict[str, Any]:
    if entry.is_text:
        return {"context": entry.scheduler.capacity}
    classes = list(entry.model.classes)
    return {"classes": classes}


def chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The documented chat template: each message as `role:` on a line, its content, a blank
    line (a play's speech format, which the built-in Shakespeare models know; roles in lower
    case, whose letters every English character model has seen), then `assistant:` and a new
    line for the reply, which ends at the next blank line."""
    turns = "".join(f"{m.role}:\n{m.content.strip()}\n\n" for m in messages)
    return turns + "assistant:\n"


def _watermark(scheme: str, key: Any, model: api.TextModel) -> list[Any]:
    if scheme == "none":
        return []
    from trustgen.safety.watermark.text import make_watermark

    return [make_watermark(scheme, key.secret, model.tokenizer.vocab_size)]


class _Inbox:
    """What the scheduler delivers for the sequences of one request, as (choice, event) pairs,
    handed to the response in batches.

    The reader is woken by a sequence's first token, by any ending, and otherwise only once
    `interval` seconds have passed since it last took its events; in between, deliveries just
    accumulate. Waking costs a trip through the event loop and, for a stream, a write to the
    client, per batch instead of per token, and needs no timer: a running sequence delivers a
    token every step, so a batch waits at most `interval` plus one step."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._events: list[tuple[int, Token | Finished]] = []
        self._urgent = False  # a first token or an ending is waiting
        self._started: set[int] = set()
        self._taken_at = -math.inf
        self._waiter: asyncio.Future[None] | None = None

    def deliverer(self, choice: int) -> Callable[[Token | Finished], None]:
        def deliver(event: Token | Finished) -> None:
            self._events.append((choice, event))
            if isinstance(event, Finished) or choice not in self._started:
                self._started.add(choice)
                self._urgent = True
            if self._waiter is not None and not self._waiter.done() and self._due():
                self._waiter.set_result(None)
        return deliver

    def _due(self) -> bool:
        return bool(self._events) and (self._urgent or time.perf_counter() - self._taken_at >= self.interval)

    async def take(self) -> list[tuple[int, Token | Finished]]:
        """The events delivered since the last take, once they are due."""
        while not self._due():
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        events, self._events, self._urgent = self._events, [], False
        self._taken_at = time.perf_counter()
        return events


def _header(chat: bool, model: str) -> dict[str, Any]:
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model}


def _manifest(entry: ServedModel, scheme: str, key_id: str) -> dict[str, Any]:
    return {"model_id": entry.model_id, "tokenizer_sha256": entry.tokenizer_sha,
            "watermark": None if scheme == "none" else {"scheme": scheme, "key_id": key_id}}


def _usage(sequences: Sequence[Generation]) -> dict[str, int]:
    prompt = sum(len(s.prompt_ids) for s in sequences)
    completion = sum(len(s.tokens) for s in sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(tokens: list[Token], tokenizer: Any) -> dict[str, Any]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token.text)
    return {"tokens": [tokenizer.decode([t.id]) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top_logprobs for t in tokens], "text_offset": offsets}


def _chat_logprobs(tokens: list[Token], tokenizer: Any) -> dict[str, Any]:
    def item(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(tokenizer.decode([t.id]), t.logprob),
                         "top_logprobs": [item(k, v) for k, v in (t.top_logprobs or {}).items()]} for t in tokens]}


async def _cancel_on_disconnect(request: Request, sequences: list[Generation]) -> None:
    """Cancel the sequences of a request as soon as its client goes away (nobody will read the
    answer): the body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for seq in sequences:
        seq.cancel()


async def _collect(inbox: _Inbox, sequences: list[Generation], request: Request, chat: bool,
                   entry: ServedModel, metrics: Metrics, started: float) -> list[dict[str, Any]]:
    texts = ["" for _ in sequences]
    tokens: list[list[Token]] = [[] for _ in sequences]
    reasons: list[str | None] = [None for _ in sequences]
    watcher = asyncio.create_task(_cancel_on_disconnect(request, sequences))
    try:
        while any(r is None for r in reasons):
            for choice, event in await inbox.take():
                if isinstance(event, Token):
                    if not tokens[choice]:
                        metrics.first_token.labels(entry.name).observe(time.perf_counter() - started)
                    texts[choice] += event.text
                    tokens[choice].append(event)
                else:
                    texts[choice] += event.text
                    reasons[choice] = event.reason
    finally:
        watcher.cancel()
        for seq in sequences:
            seq.cancel()  # no-op for finished ones
    if "cancelled" in reasons:  # the client went away; nobody reads this
        raise APIError(499, "the client closed the request.")
    if "error" in reasons:
        raise APIError(500, "generation failed on the server (its log says why); retry, or report it.")
    tokenizer = entry.model.tokenizer
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        logprobs = None
        if sequences[i].logprobs is not None:
            logprobs = (_chat_logprobs if chat else _completion_logprobs)(tokens[i], tokenizer)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": reason})
        else:
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
    return choices


async def _stream_events(inbox: _Inbox, sequences: list[Generation], header: dict[str, Any], chat: bool,
                         usage_stats: Literal["every chunk", "at the end"] | None, manifest: dict[str, Any], entry: ServedModel, metrics: Metrics,
                         started: float, route: str, request: Request,
                         echoes: list[str] | None = None) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI shape. If the client goes away, the watcher cancels the
    sequences, so their decoding stops at the next step, and this generator ends.

    Each batch the inbox hands over becomes one chunk per choice, written at once: the first
    token alone, then what was generated during each stream interval (see _Inbox). Every write
    wakes the client and costs system calls, time that a small CPU takes from decoding; a reader
    cannot tell 20 ms batches from a token-by-token stream. Interval 0 sends every token alone."""
    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    tokenizer = entry.model.tokenizer

    def chunk(choice: int, text: str | None, reason: str | None, tokens: list[Token] | None = None,
              role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            body: dict[str, Any] = {"index": choice, "delta": delta, "finish_reason": reason}
            if tokens and sequences[choice].logprobs is not None:
                body["logprobs"] = _chat_logprobs(tokens, tokenizer)
        else:
            body = {"index": choice, "text": text or "", "finish_reason": reason, "logprobs": None}
            if tokens and sequences[choice].logprobs is not None:
                body["logprobs"] = _completion_logprobs(tokens, tokenizer)
        extension = {} if choice in announced else {"trustgen": manifest}  # once per choice is enough
        announced.add(choice)
        if usage_stats == "every chunk":
            extension["usage"] = _usage(sequences)
        return "data: " + json.dumps({**header, "object": chunk_object, "choices": [body], **extension}) + "\n\n"

    def render(events: list[tuple[int, Token | Finished]]) -> str:
        """One chunk per choice with what these events bring, then a chunk per ending."""
        texts: dict[int, str] = {}
        tokens: dict[int, list[Token]] = {}
        endings: list[str] = []
        for choice, event in events:
            texts[choice] = texts.get(choice, "") + event.text
            if isinstance(event, Token):
                tokens.setdefault(choice, []).append(event)
            else:
                endings.append(chunk(choice, None, event.reason))
                open_choices.discard(choice)
        pieces = [chunk(choice, text, None, tokens.get(choice)) for choice, text in texts.items()
                  if text or (tokens.get(choice) and sequences[choice].logprobs is not None)]
        return "".join(pieces + endings)

    open_choices = set(range(len(sequences)))
    seen_first: set[int] = set()
    announced: set[int] = set()
    watcher = asyncio.create_task(_cancel_on_disconnect(request, sequences))
    try:
        if chat:
            for choice in range(len(sequences)):
                yield chunk(choice, None, None, role=True)
        for choice, prompt in enumerate(echoes or []):
            yield chunk(choice, prompt, None)
        while open_choices:
            events = await inbox.take()
            taken = time.perf_counter()
            for choice, event in events:
                if isinstance(event, Token) and choice not in seen_first:
                    seen_first.add(choice)
                    metrics.first_token.labels(entry.name).observe(taken - started)
                elif isinstance(event, Finished) and event.reason == "error":
                    failure = {"message": "generation failed on the server (its log says why).",
                               "type": "server_error", "param": None, "code": None}
                    yield "data: " + json.dumps({"error": failure}) + "\n\n"
                    return
            for batch in [[event] for event in events] if inbox.interval == 0 else [events]:
                if text := render(batch):
                    yield text
        if usage_stats is not None:
            yield "data: " + json.dumps({**header, "object": chunk_object, "choices": [],
                                         "usage": _usage(sequences)}) + "\n\n"
        yield "data: [DONE]\n\n"
        metrics.latency.labels(route).observe(time.perf_counter() - started)
    finally:
        watcher.cancel()
        for seq in sequences:
            seq.cancel()


def _decoded(data: str | None, param: str) -> bytes:
    try:
        return base64.b64decode(data or "", validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} must be base64.", param) from None


def _detect_text(text: str, store: Keystore) -> dict[str, Any]:
    from trustgen.safety.authenticity import detect_text

    found = detect_text(text, store)
    return {"kind": "text", **found.to_dict(),
            "tokens": [{"text": piece, "green": flag} for piece, flag in zip(found.pieces, found.whole.green_flags,
                                                                             strict=True)]}


def _detect_image(data: bytes, store: Keystore) -> dict[str, Any]:
    from trustgen.safety.authenticity import detect_image

    return {"kind": "image", **detect_image(data, store).to_dict()}


def _verify(body: VerifyBody, store: Keystore) -> dict[str, Any]:
    from trustgen.safety.authenticity import summary_line, verify_file
    from trustgen.safety.provenance import sidecar_path

    name = Path(body.filename).name  # shown back, never used as a path
    suffix = Path(name).suffix.lower()
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(_decoded(body.content, "content"))
        if body.manifest is not None:
            sidecar_path(path).write_text(body.manifest, encoding="utf-8")
        report = verify_file(path, store)
    report["file"] = name
    report["summary"] = summary_line(report)
    return report


def _signed_pictures(entry: ServedModel, body: ImageBody, store: Keystore, key: Any) -> list[bytes]:
    from trustgen.safety.provenance import generation_claim, sign_image
    from trustgen.safety.watermark import image as image_watermark
    from trustgen.sample.images import png_bytes

    model: api.ImageModel = entry.model
    images = model.generate(body.n, prompt=body.prompt or None, seed=body.seed)
    claim = generation_claim(model_id=entry.model_id, family=model.run_config["family"],
                             settings={"n": body.n, "prompts": [body.prompt] if body.prompt else []},
                             seed=body.seed, watermark=key, scheme=image_watermark.SCHEME)
    identity = store.signing_identity()
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for i, image in enumerate(images):
            marked = image_watermark.embed(image.transpose(1, 2, 0), key.secret)
            target = Path(folder) / f"{i}.png"
            sign_image(png_bytes(marked), target, claim, identity)
            out.append(target.read_bytes())
    return out
