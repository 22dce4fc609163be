"""What the server holds and how it is doing: `/health`, `/v1/models` and Prometheus `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trustgen.serve.state import ServedModel, State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    return {"status": "ok", "models": list(state.models)}


@router.get("/metrics")
async def prometheus(state: State) -> Response:
    metrics = state.metrics
    for entry in state.models.values():
        if entry.scheduler is not None:
            metrics.queue.labels(entry.name).set(entry.scheduler.queue_length)
            metrics.running.labels(entry.name).set(entry.scheduler.running_count)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": int(entry.run_dir.stat().st_mtime), "owned_by": "trustgen",
         "trustgen": {"kind": entry.kind, "model_id": entry.model_id,
                      **_model_details(entry)}}
        for name, entry in state.models.items()]}


def _model_details(entry: ServedModel) -> dict[str, Any]:
    if entry.is_text:
        return {"context": entry.scheduler.capacity, "tokenizer": entry.model.tokenizer.kind}
    if entry.kind == "music":
        return {"tokenizer": entry.model.tokenizer.kind, "route": "/v1/audio/generations"}
    classes = list(entry.model.classes)
    return {"classes": classes}
