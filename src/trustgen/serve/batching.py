"""Continuous batching: one loop decodes every running sequence together, step by step.

Iteration-level scheduling (Yu et al. 2022, "Orca", OSDI; as in vLLM): between two decode steps
the scheduler drops the sequences that finished or whose client went away and admits waiting
requests, so a new request never waits for a whole batch to end and a finished one never holds a
place. A newcomer's prompt is prefilled on its own (prompts differ in length; its first token
comes straight from the prefill), then its cache joins the batch cache, where every row keeps its
own length (`RaggedKVCache`), and from then on it advances with the others in one forward pass.

Each sequence carries its own processor chain (temperature, top-p, watermark...) and its own
random generator seeded from the request, so a seed gives the same text whether the sequence ran
alone or beside others. The waiting queue is bounded: `submit` refuses work beyond it (the HTTP
layer answers 429), which is the server's backpressure.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trustgen.api import StopScanner, TextModel
from trustgen.config import SampleConfig
from trustgen.errors import TrustgenError
from trustgen.sample.decode import choose_tokens, processed_scores
from trustgen.sample.kv_cache import decoding_for
from trustgen.sample.processors import LogitsProcessor, chain_decides

log = logging.getLogger("trustgen.serve")
UNLIMITED = 1 << 30  # the "context" of a model without one


class QueueFull(TrustgenError):
    """The waiting queue is at its limit; try again later."""


class BeyondContext(TrustgenError):
    """The prompt plus the tokens asked for do not fit in the model's context."""


@dataclass
class Token:
    """One generated token, as the client sees it."""

    id: int
    text: str  # the new text it completes (may be "" while a multi-byte character is incomplete)
    logprob: float | None = None  # log-probability under the model (before the sampling chain)
    top_logprobs: dict[str, float] | None = None


@dataclass
class Finished:
    reason: str  # "stop" (a stop string), "length" (max tokens), "cancelled" or "error" (the server failed)
    text: str  # text released at the end (held back until no stop string could start in it)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Generation:
    """A sequence to generate. `deliver` is called in the event loop with each Token and finally
    one Finished; it must be quick (e.g. put the event on an asyncio queue)."""

    prompt_ids: list[int]
    config: SampleConfig
    chain: list[LogitsProcessor]
    deliver: Callable[[Token | Finished], None]
    logprobs: int | None = None  # how many alternatives to report per token (None: no logprobs)
    # -- state the scheduler keeps --
    tokens: list[int] = field(default_factory=list)
    decode_steps: int = 0  # batched forward passes this sequence took part in (tests check cancellation)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating at the next step (the client went away)."""
        self.cancelled = True


class _Running:
    """A request being decoded: its place in the batch, generator, text decoder and stop scanner."""

    def __init__(self, request: Generation, tokenizer: Any, device: torch.device) -> None:
        self.request = request
        seed = request.config.seed if request.config.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.text = tokenizer.stream_decoder()
        self.stops = StopScanner(request.config.stop)
        # Every token so far, for the processors (repetition penalties, the watermark's context).
        prompt = request.prompt_ids
        self.history = torch.zeros((1, len(prompt) + request.config.max_new_tokens), dtype=torch.long, device=device)
        self.history[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.length = len(prompt)


class Scheduler:
    """Owns the model while serving: requests go in with `submit`, tokens come out through each
    request's `deliver`; `run` is the decoding loop (a task in the server's event loop) and
    `stop` ends it."""

    def __init__(self, model: TextModel, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise TrustgenError("the batch must hold at least one sequence and the queue cannot be negative.")
        self.model = model
        self.decoding = decoding_for(model.model)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.capacity = model.model.context_limit or UNLIMITED  # a recurrent state has no context limit
        self.waiting: collections.deque[Generation] = collections.deque()
        self.running: list[_Running] = []  # in batch-row order
        self.batch: Any = None
        self.has_work: asyncio.Event | None = None  # made by `run`, in the serving event loop
        self.stopping = False
        self.generated_tokens = 0
        self.decode_steps = 0
        self.on_step: Callable[[int, float], None] | None = None  # (rows, seconds) per decode step, for metrics
        self.on_tokens: Callable[[int], None] | None = None  # tokens delivered, for metrics

    # -- the outside (all of it from the event loop that runs `run`) -----------------------------

    def submit(self, request: Generation) -> None:
        limit = self.capacity
        if len(request.prompt_ids) + request.config.max_new_tokens > limit:
            raise BeyondContext(f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                                f"({request.config.max_new_tokens}) exceeds the model's context of {limit} tokens.")
        free_rows = max(0, self.max_batch - len(self.running))
        if len(self.waiting) >= self.max_queue + free_rows:  # what waits beyond the free rows is the queue
            raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting; retry shortly.")
        self.waiting.append(request)
        if self.has_work is not None:
            self.has_work.set()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running_count(self) -> int:
        return len(self.running)

    def stop(self) -> None:
        self.stopping = True
        if self.has_work is not None:
            self.has_work.set()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Decode until `stop`, yielding to the event loop between steps.

        The steps run in the event loop's own thread. A step takes milliseconds, and between
        two of them the loop reads new requests and writes out tokens; a separate decoding
        thread would instead hand every token across threads, and on a small CPU the two
        threads then queue behind each other for the interpreter and the cores (measured here
        with one streaming client: a third of the tokens/s of the direct Python API)."""
        self.has_work = asyncio.Event()
        while not self.stopping:
            if not self.waiting and not self.running:
                self.has_work.clear()
                await self.has_work.wait()
                continue
            self._work()
            await asyncio.sleep(0)
        for entry in self.running:  # shutting down: tell every client
            self._finish(entry, "cancelled")

    def _work(self) -> None:
        """Admit what fits, take one decode step, let finished sequences go."""
        admitted: list[Generation] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            request = self.waiting.popleft()
            if request.cancelled:
                request.deliver(Finished("cancelled", "", len(request.prompt_ids), 0))
            else:
                admitted.append(request)
        try:
            with torch.inference_mode():
                for request in admitted:
                    try:
                        self._admit(request)
                    except Exception:  # this request alone fails; the batch goes on
                        log.exception("a request could not be started")
                        request.cancelled = True
                        request.deliver(Finished("error", "", len(request.prompt_ids), 0))
                self._drop_finished()
                if self.running:
                    self._step()
                    self._drop_finished()
        except Exception:  # a failed step must not leave every client waiting forever
            log.exception("a decode step failed; its sequences end with an error")
            for entry in self.running:  # every client hears the end, including those already gone
                request = entry.request
                reason = "cancelled" if request.cancelled else "error"
                request.cancelled = True
                request.deliver(Finished(reason, "", len(request.prompt_ids), len(request.tokens)))
            self.running, self.batch = [], None

    def _admit(self, request: Generation) -> None:
        model = self.model.model
        logits, state = self.decoding.prefill(model, [request.prompt_ids], self.capacity)
        if self.batch is None:
            self.batch = self.decoding.batch_cache(model, self.max_batch, self.capacity)
        entry = _Running(request, self.model.tokenizer, self.model.device)
        row = self.batch.add(state)
        assert row == len(self.running)
        self.running.append(entry)
        self._emit([entry], logits)

    def _step(self) -> None:
        started = time.perf_counter()
        last = torch.tensor([entry.request.tokens[-1] for entry in self.running], device=self.model.device)
        logits = self.decoding.decode_step(self.model.model, last, self.batch)
        for entry in self.running:
            entry.request.decode_steps += 1
        self.decode_steps += 1
        self._emit(self.running, logits)
        if self.on_step is not None:
            self.on_step(len(self.running), time.perf_counter() - started)

    def _emit(self, entries: list[_Running], logits: torch.Tensor) -> None:
        """Choose and deliver each entry's next token from its row of logits. Rows that share
        a processor chain (requests with the same settings) are processed as one batch; each
        row still draws with its own generator."""
        vocab = self.model.tokenizer.vocab_size
        groups: dict[int, list[int]] = {}
        for row, entry in enumerate(entries):
            if not entry.request.cancelled:
                groups.setdefault(id(entry.request.chain), []).append(row)
        for rows in groups.values():
            chain = entries[rows[0]].request.chain
            scores = processed_scores(logits[rows], self._histories([entries[r] for r in rows]), chain, vocab)
            decides = chain_decides(chain)
            for index, row in enumerate(rows):
                entry = entries[row]
                greedy = entry.request.config.greedy or decides
                token = int(choose_tokens(scores[index: index + 1], greedy, entry.generator)[0])
                self._deliver(entry, token, logits[row])

    def _histories(self, entries: list[_Running]) -> torch.Tensor:
        """The entries' tokens so far as one batch, left-padded as the processors expect."""
        if len(entries) == 1:
            return entries[0].history[:, : entries[0].length]
        longest = max(entry.length for entry in entries)
        batch = torch.full((len(entries), longest), self.model.model.config.vocab_size, dtype=torch.long,
                           device=self.model.device)
        for row, entry in enumerate(entries):
            batch[row, longest - entry.length:] = entry.history[0, : entry.length]
        return batch

    def _deliver(self, entry: _Running, token: int, row_logits: torch.Tensor) -> None:
        request = entry.request
        request.tokens.append(token)
        entry.history[0, entry.length] = token
        entry.length += 1
        self.generated_tokens += 1
        logprob, alternatives = None, None
        if request.logprobs is not None:
            logprob, alternatives = self._logprobs(row_logits, token, request.logprobs)
        request.deliver(Token(token, entry.stops.feed(entry.text.push(token)), logprob, alternatives))
        if self.on_tokens is not None:
            self.on_tokens(1)

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[str, float]]:
        log_probs = logits.float()[: self.model.tokenizer.vocab_size].log_softmax(dim=-1)
        best = torch.topk(log_probs, top) if top > 0 else None
        alternatives = {} if best is None else {
            self.model.tokenizer.decode([i]): v for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)}
        return float(log_probs[token]), alternatives

    def _drop_finished(self) -> None:
        for row in range(len(self.running) - 1, -1, -1):
            entry = self.running[row]
            request = entry.request
            reason = "cancelled" if request.cancelled else "stop" if entry.stops.finished else \
                "length" if len(request.tokens) >= request.config.max_new_tokens else None
            if reason is None:
                continue
            self.batch.remove(row)  # the last row moves into `row`: mirror that in the list
            self.running[row] = self.running[-1]
            self.running.pop()
            self._finish(entry, reason)

    def _finish(self, entry: _Running, reason: str) -> None:
        request = entry.request
        tail = "" if reason == "cancelled" else entry.stops.feed(entry.text.flush()) + entry.stops.close()
        request.deliver(Finished(reason, tail, len(request.prompt_ids), len(request.tokens)))
