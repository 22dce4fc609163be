"""Request bodies (pydantic, in the OpenAI shape with trustgen's extension fields) and errors in
the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    watermark: Literal["kgw", "synthid", "none"] | None = None  # trustgen extension; default kgw

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


class AudioBody(_Body):
    model: str
    n: int = Field(1, ge=1, le=4)
    bars: int = Field(8, ge=1, le=32)  # a free piece's most bars (a harmonization is as long as its melody)
    seed: int | None = Field(None, ge=0, lt=2**63)
    temperature: float = Field(1.0, gt=0, le=2)
    prompt: str | None = Field(None, max_length=4000)  # a soprano line to harmonize: "67:4 69:4 71:8"
    response_format: Literal["wav", "midi"] = "wav"  # midi: the score and piano roll only, no audio


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

    def __reduce__(self) -> tuple[type[APIError], tuple[Any, ...]]:
        """Rebuilt whole when raised in the trust worker process (see serve.trust)."""
        return APIError, (self.status, self.message, self.param, self.code, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def validation_message(error: dict[str, Any]) -> tuple[str, str]:
    """(param, message) for a pydantic error; the value is shown back only when it is short."""
    if error.get("type") == "json_invalid":  # loc holds the character position, not a field
        position = error.get("loc", ("body", "?"))[-1]
        return "body", f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')} " \
                       f"at character {position})."
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    got = error.get("input")
    shown = "" if got is None or isinstance(got, dict) else f" (got {json.dumps(got, default=type)[:80]})"
    return where, f"{where}: {error.get('msg', 'invalid value')}{shown}"

