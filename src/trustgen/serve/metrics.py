"""Prometheus metrics of the server: queue, batch, tokens, latency, refusals (served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue = Gauge("trustgen_queue_length", "Requests waiting for a place in the batch",
                           ["model"], registry=self.registry)
        self.running = Gauge("trustgen_running_sequences", "Sequences being decoded", ["model"], registry=self.registry)
        self.tokens = Counter("trustgen_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.tokens_per_second = Gauge("trustgen_tokens_per_second", "Tokens per second over the last decode step",
                                       ["model"], registry=self.registry)
        self.latency = Histogram("trustgen_request_seconds", "Time from request to its last token",
                                 ["route"], registry=self.registry)
        self.first_token = Histogram("trustgen_time_to_first_token_seconds", "Time from request to first token",
                                     ["model"], registry=self.registry)
        self.rejected = Counter("trustgen_rejected_requests", "Requests refused (queue full or rate limited)",
                                ["reason"], registry=self.registry)



def step_recorder(metrics: Metrics, name: str) -> Any:
    def record(rows: int, seconds: float) -> None:
        metrics.tokens_per_second.labels(name).set(rows / seconds if seconds > 0 else 0.0)
    return record


