"""The text routes, in the OpenAI shape: `/v1/completions` and `/v1/chat/completions`, whole or
streamed (server-sent events), decoded by each model's continuous-batching scheduler. Text is
watermarked through the API's trust workflow (kgw unless the request says otherwise) and every
answer carries what a manifest would say in the extension field `trustgen`."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trustgen import api
from trustgen.errors import TrustgenError
from trustgen.safety.trust import DEFAULT_TEXT_WATERMARK, Mark
from trustgen.sample.processors import build_chain
from trustgen.serve.batching import BeyondContext, Finished, Generation, QueueFull, Token
from trustgen.serve.metrics import Metrics
from trustgen.serve.schemas import APIError, ChatBody, ChatMessage, CompletionBody
from trustgen.serve.state import ServedModel, ServerState, State, text_model

CHAT_STOP = "\n\n"  # a reply ends where the template starts the next speaker
DEFAULT_TOKENS = 16  # max_tokens when a completion request gives none (OpenAI's default)
DEFAULT_CHAT_TOKENS = 256  # ... and a chat request, within the context
RETRY_AFTER_SECONDS = 1

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, state: State) -> Response:
    entry = text_model(state.models, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must be a non-empty string (or a list of them).", "prompt")
    return await _generate(state, entry, body, prompts, request, chat=False)

@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: Request, state: State) -> Response:
    entry = text_model(state.models, body.model)
    return await _generate(state, entry, body, [chat_prompt(body.messages)], request, chat=True)

async def _generate(state: ServerState, entry: ServedModel, body: CompletionBody | ChatBody, prompts: list[str],
                    request: Request, chat: bool) -> Response:
    started = time.perf_counter()
    model: api.TextModel = entry.model
    stops = list(body.stop or []) + ([CHAT_STOP] if chat else [])
    settings = {"max_new_tokens": body.max_tokens or 1, "temperature": body.temperature,
                "top_p": None if body.top_p == 1 else body.top_p, "top_k": body.top_k, "min_p": body.min_p,
                "stop": tuple(stops)}
    config = api.sample_config({k: v for k, v in settings.items() if v is not None})
    scheme = body.watermark or DEFAULT_TEXT_WATERMARK
    trust = model.trust(scheme, state.keys)
    metrics = state.metrics
    top = (body.top_logprobs or 0) if chat and body.logprobs else None if chat else body.logprobs
    inbox = _Inbox(state.stream_interval if body.stream else math.inf)  # a whole answer needs only the endings
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
                chain = state.chains.get(entry.name, config, scheme, lambda: [*build_chain(config), *trust.processors])
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
    manifest = _manifest(entry, trust.mark)
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


def chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The documented chat template: each message as `role:` on a line, its content, a blank
    line (a play's speech format, which the built-in Shakespeare models know; roles in lower
    case, whose letters every English character model has seen), then `assistant:` and a new
    line for the reply, which ends at the next blank line."""
    turns = "".join(f"{m.role}:\n{m.content.strip()}\n\n" for m in messages)
    return turns + "assistant:\n"


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


def _manifest(entry: ServedModel, mark: Mark | None) -> dict[str, Any]:
    """What a manifest would say about the answer: model, tokenizer, watermark (never a key)."""
    return {"model_id": entry.model_id, "tokenizer_sha256": entry.tokenizer_sha,
            "watermark": None if mark is None else mark.to_dict()}


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

