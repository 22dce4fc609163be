"""`/v1/detect` (is this text or image watermarked with the server's key?) and `/v1/verify`
(a file's signed manifest and watermark), both through trustgen.safety.trust."""

from __future__ import annotations

import asyncio
import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from trustgen.errors import TrustgenError
from trustgen.safety.trust import (
    Keys,
    detect_image,
    detect_text,
    sidecar_path,
    summary_line,
    verify,
)
from trustgen.serve.schemas import APIError, DetectBody, VerifyBody
from trustgen.serve.state import State

router = APIRouter()
# Detection runs in a worker thread, but mostly in Python, so it competes with the event loop
# for the interpreter lock: a megabyte stalled running streams and /health for ~0.9 s (issue 22).
# 100,000 characters cost about 0.85 CPU-seconds (2-core Xeon, busy machine). Longer: `trustgen detect`.
MAX_DETECT_CHARS = 100_000


@router.post("/v1/detect")
async def detect(body: DetectBody, state: State) -> dict[str, Any]:
    if (body.text is None) == (body.image is None):
        raise APIError(400, "send exactly one of text or image (base64).", "text")
    if body.text is not None:
        if not body.text.strip():
            raise APIError(400, "text is empty.", "text")
        if len(body.text) > MAX_DETECT_CHARS:
            raise APIError(413, f"text is {len(body.text):,} characters; /v1/detect takes at most "
                                f"{MAX_DETECT_CHARS:,} (test longer files with trustgen detect).", "text", "text_too_long")
        return await asyncio.to_thread(_detect_text, body.text, state.keys)
    return await asyncio.to_thread(_detect_image, _decoded(body.image, "image"), state.keys)


@router.post("/v1/verify")
async def verify_upload(body: VerifyBody, state: State) -> dict[str, Any]:
    return await asyncio.to_thread(_verify, body, state.keys)


def _decoded(data: str | None, param: str) -> bytes:
    try:
        return base64.b64decode(data or "", validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} must be base64.", param) from None


def _detect_text(text: str, keys: Keys) -> dict[str, Any]:
    found = detect_text(text, keys.store())
    return {"kind": "text", **found.to_dict(),
            "tokens": [{"text": piece, "green": flag} for piece, flag in zip(found.pieces, found.whole.green_flags,
                                                                             strict=True)]}


def _detect_image(data: bytes, keys: Keys) -> dict[str, Any]:
    return {"kind": "image", **detect_image(data, keys.store()).to_dict()}


def _verify(body: VerifyBody, keys: Keys) -> dict[str, Any]:
    name = Path(body.filename).name  # shown back, never used as a path
    suffix = Path(name).suffix.lower()
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(_decoded(body.content, "content"))
        if body.manifest is not None:
            sidecar_path(path).write_text(body.manifest, encoding="utf-8")
        try:
            report = verify(path, keys)
        except TrustgenError as exc:  # its sentence names the temporary file: name the upload instead
            raise APIError(400, str(exc).replace(path.name, name), "content") from None
    report["file"] = name
    report["summary"] = summary_line(report)
    return report
