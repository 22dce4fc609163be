"""`/v1/images/generations` in the OpenAI shape: every picture comes watermarked and signed with
a C2PA manifest (by the API's generate path), with the model id and watermark in `trustgen`."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter

from trustgen.safety.trust import DEFAULT_IMAGE_WATERMARK, Artifact
from trustgen.serve.schemas import APIError, ImageBody
from trustgen.serve.state import ServedModel, ServerState, State, served_model

router = APIRouter()


@router.post("/v1/images/generations")
async def images(body: ImageBody, state: State) -> dict[str, Any]:
    entry = served_model(state.models, body.model, "image")
    size = entry.model.model.config.image_size
    if body.size is not None and body.size != f"{size}x{size}":
        raise APIError(400, f"size: this model makes {size}x{size} images, not {body.size}.", "size")
    pictures = await asyncio.to_thread(_signed_pictures, entry, body, state)
    marks = [written.watermark for _, written in pictures]
    notes = sorted({written.note for _, written in pictures if written.note})
    trust: dict[str, Any] = {"model_id": entry.model_id,
                             "watermark": marks[0].to_dict() if marks and all(marks) else None}
    if notes:  # some picture could not carry the mark: it is not claimed, and the reason is given
        trust["watermark_note"] = "; ".join(notes)
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode(),
                      "trustgen": {"watermark": None if written.watermark is None else written.watermark.to_dict(),
                                   "watermark_note": written.note}} for png, written in pictures],
            "trustgen": trust}


def _signed_pictures(entry: ServedModel, body: ImageBody, state: ServerState) -> list[tuple[bytes, Artifact]]:
    """Each picture as PNG bytes, watermarked when it can carry the mark, then signed."""
    images = entry.model.generate(body.n, prompt=body.prompt or None, seed=body.seed,
                                  watermark=DEFAULT_IMAGE_WATERMARK, keystore=state.keys)
    return images.encoded()
