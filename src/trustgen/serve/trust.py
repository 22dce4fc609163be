"""`/v1/detect` (is this text or image watermarked with the server's key?) and `/v1/verify`
(a file's signed manifest and watermark), both through trustgen.safety.trust.

Both run in a separate worker process (`TrustWorker`), not a thread of the server's: detection is
mostly Python, and a worker thread shares the interpreter lock with the event loop, which also
runs the decode steps of every stream. Beside a 100,000-character /v1/detect, streams then
stopped for up to 0.6 s and /health took 0.3 s at the median (bench/serve.py, 2 cores).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import multiprocessing
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response

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
# 100,000 characters cost about 0.35 CPU-seconds (2-core Xeon). Longer: `trustgen detect`.
MAX_DETECT_CHARS = 100_000


class TrustWorker:
    """One worker process, shared by every app in this process and started at its first use
    (spawned: a forked copy of a server would inherit its threads' locks). It reads the keystore
    from its path for each call; keys never cross the process boundary. A worker that dies (out
    of memory, killed) is replaced on the next call, and its caller gets a 500."""

    _pool: ProcessPoolExecutor | None = None

    @classmethod
    async def run(cls, function: Callable[..., bytes], *args: Any) -> Response:
        if cls._pool is None:
            cls._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_one_thread)
        try:
            rendered = await asyncio.get_running_loop().run_in_executor(cls._pool, function, *args)
        except BrokenProcessPool:
            cls._pool = None
            raise APIError(500, "the detection worker stopped; try again.") from None
        # Rendered in the worker too: a text's report lists every token, 100,000 of them at most.
        return Response(rendered, media_type="application/json")


def _one_thread() -> None:
    """The worker's torch uses one thread: the server's decode steps keep the other cores."""
    import torch

    torch.set_num_threads(1)


@router.post("/v1/detect", response_model=None)
async def detect(body: DetectBody, state: State) -> Response:
    if (body.text is None) == (body.image is None):
        raise APIError(400, "send exactly one of text or image (base64).", "text")
    if body.text is not None:
        if not body.text.strip():
            raise APIError(400, "text is empty.", "text")
        if len(body.text) > MAX_DETECT_CHARS:
            raise APIError(413, f"text is {len(body.text):,} characters; /v1/detect takes at most "
                                f"{MAX_DETECT_CHARS:,} (test longer files with trustgen detect).", "text", "text_too_long")
        return await TrustWorker.run(_detect_text, body.text, state.keys.path)
    return await TrustWorker.run(_detect_image, _decoded(body.image, "image"), state.keys.path)


@router.post("/v1/verify", response_model=None)
async def verify_upload(body: VerifyBody, state: State) -> Response:
    return await TrustWorker.run(_verify, body, state.keys.path)


def _decoded(data: str | None, param: str) -> bytes:
    try:
        return base64.b64decode(data or "", validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} must be base64.", param) from None


def _keys(keystore: Path) -> Keys:
    return Keys(keystore, announce=None)


def _detect_text(text: str, keystore: Path) -> bytes:
    found = detect_text(text, _keys(keystore).store())
    return _json({"kind": "text", **found.to_dict(),
                  "tokens": [{"text": piece, "green": flag}
                             for piece, flag in zip(found.pieces, found.whole.green_flags, strict=True)]})


def _detect_image(data: bytes, keystore: Path) -> bytes:
    return _json({"kind": "image", **detect_image(data, _keys(keystore).store()).to_dict()})


def _verify(body: VerifyBody, keystore: Path) -> bytes:
    name = Path(body.filename).name  # shown back, never used as a path
    suffix = Path(name).suffix.lower()
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(_decoded(body.content, "content"))
        if body.manifest is not None:
            sidecar_path(path).write_text(body.manifest, encoding="utf-8")
        try:
            report = verify(path, _keys(keystore))
        except TrustgenError as exc:  # its sentence names the temporary file: name the upload instead
            raise APIError(400, str(exc).replace(path.name, name), "content") from None
    report["file"] = name
    report["summary"] = summary_line(report)
    return _json(report)


def _json(report: dict[str, Any]) -> bytes:
    return json.dumps(report).encode()
