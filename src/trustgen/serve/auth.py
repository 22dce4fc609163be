"""Who may call the server and how much: API keys (kept as SHA-256 hashes, compared in constant
time), a rate limit per key, and the largest request body, checked before any route runs."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from trustgen.errors import TrustgenError
from trustgen.serve.metrics import Metrics
from trustgen.serve.schemas import error_response

MAX_BODY_BYTES = 16 << 20  # images and files to verify arrive base64-encoded in JSON


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
            return error_response(401, "a valid API key is required: send Authorization: Bearer KEY.",
                                   code="invalid_api_key")
        wait = self.limiter.allow(presented)
        if wait > 0:
            self.metrics.rejected.labels("rate_limit").inc()
            return error_response(429, "too many requests for this API key; slow down.", code="rate_limit",
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
    return error_response(413, f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes.")

