"""`/v1/audio/generations`: four-voice music from a music run (trained with --data bach or a folder
of scores), free or harmonizing a soprano line given as a note list. Each piece is written the way
`trustgen generate` writes it (trustgen.api.Composition.save): its notes carry the symbolic
watermark, its MIDI file a signed sidecar manifest, its WAV the audio watermark and a C2PA
manifest inside it; they come back base64-encoded with the piano roll as a PNG."""

from __future__ import annotations

import asyncio
import base64
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from trustgen import api
from trustgen.data.music import Chorale, melody_from_notes
from trustgen.errors import TrustgenError
from trustgen.safety.trust import DEFAULT_TEXT_WATERMARK, Artifact, sidecar_path
from trustgen.serve.schemas import APIError, AudioBody
from trustgen.serve.state import ServedModel, ServerState, State, served_model

# A harmonization decodes 4 tokens per 16th of melody: 32 bars of 4/4, as a free piece's most.
MAX_MELODY_STEPS = 32 * api.STEPS_PER_BAR

router = APIRouter()


@router.post("/v1/audio/generations")
async def audio(body: AudioBody, state: State) -> dict[str, Any]:
    entry = served_model(state.models, body.model, "music")
    melody = _melody(body.prompt) if body.prompt and body.prompt.strip() else None
    pieces = await asyncio.to_thread(_pieces, entry, body, melody, state)
    return {"created": int(time.time()), "model": entry.name, "data": pieces,
            "trustgen": {"model_id": entry.model_id, "tokenizer_sha256": entry.tokenizer_sha,
                         "watermark": pieces[0]["trustgen"]["watermark"]}}


def _melody(prompt: str) -> Chorale:
    """The soprano line of a note list; never a file name (the server reads no file a client names)."""
    try:
        return melody_from_notes(prompt, max_steps=MAX_MELODY_STEPS)
    except TrustgenError as exc:
        raise APIError(400, f"prompt: {exc}", "prompt") from None


def _pieces(entry: ServedModel, body: AudioBody, melody: Chorale | None, state: ServerState) -> list[dict[str, Any]]:
    compositions = api.compose(entry.model, body.n, melody=melody, bars=body.bars, temperature=body.temperature,
                               seed=body.seed, watermark=DEFAULT_TEXT_WATERMARK, keystore=state.keys)
    with tempfile.TemporaryDirectory() as folder:
        return [{"index": i, **_encoded(piece, Path(folder) / f"piece-{i + 1}", body.response_format == "wav")}
                for i, piece in enumerate(compositions)]


def _encoded(piece: api.Composition, stem: Path, audio: bool) -> dict[str, Any]:
    """One piece's files as the CLI writes them, base64-encoded, with what each carries."""
    written = {artifact.path.suffix: artifact for artifact in piece.save(stem, audio=audio)}
    midi: Artifact = written[".mid"]
    result: dict[str, Any] = {
        "bars": len(piece.chorale.bars), "midi_b64": _b64(midi.path), "midi_manifest": sidecar_path(midi.path).read_text(encoding="utf-8"),
        "piano_roll_png_b64": _b64(written[".png"].path),
        "trustgen": {"watermark": None if piece.watermark is None else piece.watermark.to_dict()}}
    if audio:
        wav = written[".wav"]
        result["wav_b64"] = _b64(wav.path)
        result["trustgen"]["audio_watermark"] = None if wav.watermark is None else wav.watermark.to_dict()
        result["trustgen"]["audio_watermark_note"] = wav.note
    return result


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
