"""What the server holds, shared by its routes through `app.state.server`: the served models
(each text model with its continuous-batching scheduler), the keys, the metrics and the shared
processor chains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from trustgen import api
from trustgen.data.tokenizers import MusicTokenizer
from trustgen.errors import TrustgenError
from trustgen.safety.trust import Keys
from trustgen.serve.batching import Scheduler
from trustgen.serve.metrics import Metrics
from trustgen.serve.schemas import APIError

# Where each kind of model is served, for the error that sends a request to the right route.
ROUTES = {"text": "a text model; use /v1/completions or /v1/chat/completions",
          "image": "an image model; use /v1/images/generations",
          "music": "a music model; use /v1/audio/generations"}


@dataclass
class ServedModel:
    name: str
    run_dir: Path
    model: Any  # api.TextModel or api.ImageModel
    model_id: str  # SHA-256 of the weights
    scheduler: Scheduler | None = None
    tokenizer_sha: str | None = None
    kind: str = "text"  # "text", "image" or "music" (a TextModel whose tokens are a score)

    @property
    def is_text(self) -> bool:
        return self.kind == "text"


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


@dataclass
class ServerState:
    models: dict[str, ServedModel]
    keys: Keys  # watermark key and signing identity
    metrics: Metrics
    chains: SharedChains
    stream_interval: float  # seconds between two chunks of a stream after its first token


def load_models(runs: Sequence[Path], keys: Keys, max_batch: int, max_queue: int) -> dict[str, ServedModel]:
    served: dict[str, ServedModel] = {}
    for run in runs:
        run = Path(run)
        name = run.resolve().name
        if name in served:
            raise TrustgenError(f"two runs are both named {name!r}; serve runs with different folder names.")
        model = api.load(run)
        entry = ServedModel(name, run, model, model.model_id, kind=_kind(model))
        if entry.kind == "music":  # composed whole by /v1/audio/generations, not decoded by a scheduler
            entry.tokenizer_sha = model.trust(keystore=keys).tokenizer_sha256
        elif entry.is_text:
            entry.scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue)
            # The tokenizer is remembered in the keystore, so /v1/detect knows it.
            entry.tokenizer_sha = model.trust(keystore=keys).tokenizer_sha256
        served[name] = entry
    return served


def _kind(model: Any) -> str:
    if isinstance(model, api.ImageModel):
        return "image"
    return "music" if model.tokenizer.kind == MusicTokenizer.kind else "text"


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]  # a route's parameter: the server's state


def text_model(models: dict[str, ServedModel], name: str) -> ServedModel:
    entry = models.get(name)
    if entry is None:
        raise APIError(404, f"the model {name!r} does not exist; the models here are: {', '.join(models)}.", "model",
                       "model_not_found")
    if not entry.is_text:
        raise APIError(400, f"{name!r} is {ROUTES[entry.kind]}.", "model", "wrong_model_kind")
    return entry


def served_model(models: dict[str, ServedModel], name: str, kind: str) -> ServedModel:
    """The model `name`, which must be of `kind` ("image" or "music"); else a 404 or 400 that
    names the models of that kind."""
    entry = models.get(name)
    if entry is None or entry.kind != kind:
        wanted = ", ".join(n for n, e in models.items() if e.kind == kind) or "none"
        raise APIError(404 if entry is None else 400, f"no {kind} model named {name!r}; the {kind} models here are: "
                       f"{wanted}." + ("" if entry is None else f" ({name!r} is {ROUTES[entry.kind]}.)"), "model")
    return entry
