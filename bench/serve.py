"""The HTTP server under load, against the Python API on the same model.

Trains the demo's model (the default character GPT on the built-in Shakespeare; `--train`
seconds, speed does not depend on how well it is trained) or reuses bench/out/serve/run, starts
`trustgen serve` in its own process on loopback, and measures with real HTTP clients:

- the Python API's tokens/s for one watermarked sample (the baseline), and one streaming
  client's tokens/s through the server: the server's overhead;
- aggregate tokens/s with 16 concurrent streaming clients, against one client's;
- time to first token at p50 / p99 under that load;
- 200 concurrent requests with a queue limit of 64: how many got a full answer, a 429, an error
  or no answer; the server's resident memory before, after, and after a second such storm;
- whether a `/v1/detect` of the largest text it takes stalls the others: the longest gap between
  two chunks of a running stream, and `/health`'s latency, alone and while detection runs.

    python bench/serve.py            # about 3 minutes on 2 cores
    python bench/serve.py --quick    # ~3.5 CPU-minutes, most of them training the model if none is cached
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from common import Results, environment

from trustgen import api
from trustgen.data.text import shakespeare_documents
from trustgen.safety.keys import Keystore
from trustgen.safety.watermark.text import make_watermark
from trustgen.serve.trust import MAX_DETECT_CHARS

OUT = Path(__file__).parent / "out" / "serve"
PROMPT = "ROMEO:\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_once(client: httpx.Client, url: str, max_tokens: int, seed: int) -> tuple[int, float, float]:
    """(tokens, seconds to first token, total seconds) of one streamed completion. The client
    reads raw bytes and parses only the usage event at the end, as `curl -N` would: on two
    cores, a client that decodes every event in Python takes CPU from the server it measures.
    Like any real client, it keeps its connection open from one request to the next."""
    body = {"model": "run", "prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    received = bytearray()
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for piece in response.iter_raw():
            if first is None:
                first = time.perf_counter() - started
            received += piece
    elapsed = time.perf_counter() - started
    events = [e for e in bytes(received).split(b"\n\n") if e.startswith(b"data: {")]
    usage = json.loads(events[-1][6:])["usage"]
    return usage["completion_tokens"], first or 0.0, elapsed


def longest_gap(client: httpx.Client, url: str, max_tokens: int, seed: int) -> float:
    """The longest wait, in seconds, between two chunks of one streamed completion (after the first)."""
    body = {"model": "run", "prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "temperature": 0.8,
            "stream": True}
    arrivals = []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for _ in response.iter_raw():
            arrivals.append(time.perf_counter())
    return max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0)


def stall(url: str, max_tokens: int, detect_text: str | None, streams: int = 8) -> tuple[float, float]:
    """(longest gap in `streams` streams one after another, slowest /health answer), both in
    seconds, while `detect_text` is sent to /v1/detect over and over (None: nothing beside the
    streams). Several streams, since one fits in the context only a few detections long."""
    done = threading.Event()
    health: list[float] = []

    def detecting() -> None:
        with httpx.Client(timeout=300) as connection:
            while not done.is_set():
                connection.post(url + "/v1/detect", json={"text": detect_text}).raise_for_status()

    def probing() -> None:
        with httpx.Client(timeout=300) as connection:
            while not done.is_set():
                started = time.perf_counter()
                connection.get(url + "/health").raise_for_status()
                health.append(time.perf_counter() - started)
                time.sleep(0.05)

    helpers = [threading.Thread(target=probing)] + ([threading.Thread(target=detecting)] if detect_text else [])
    for t in helpers:
        t.start()
    try:
        time.sleep(0.5)  # detection under way before the stream starts
        with httpx.Client(timeout=300) as connection:
            gap = max(longest_gap(connection, url, max_tokens, seed=seed) for seed in range(streams))
    finally:
        done.set()
        for t in helpers:
            t.join()
    return gap, max(health)


def concurrent_streams(url: str, clients: int, requests_each: int, max_tokens: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s and every request's time to first token."""
    results: list[tuple[int, float, float]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=300) as connection:
            for r in range(requests_each):
                outcome = stream_once(connection, url, max_tokens, seed=index * 100 + r)
                with lock:
                    results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return sum(r[0] for r in results) / elapsed, [r[1] for r in results]


def storm(url: str, count: int, max_tokens: int) -> dict[str, int]:
    outcomes: dict[str, int] = {"full answer": 0, "429": 0, "error": 0, "no answer (timeout)": 0}
    lock = threading.Lock()

    def one(seed: int) -> None:
        body = {"model": "run", "prompt": PROMPT, "max_tokens": max_tokens, "seed": seed}
        try:
            response = httpx.post(url + "/v1/completions", json=body, timeout=300)
            if response.status_code == 200 and response.json()["usage"]["completion_tokens"] == max_tokens:
                kind = "full answer"
            else:
                kind = "429" if response.status_code == 429 and "Retry-After" in response.headers else "error"
        except httpx.TimeoutException:
            kind = "no answer (timeout)"
        except httpx.HTTPError:
            kind = "error"
        with lock:
            outcomes[kind] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train", default="60s", help="training budget if no run is cached")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="alternating API / server rounds for one client")
    parser.add_argument("--server-threads", type=int, help="trustgen serve --threads")
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    tokens = 32 if args.quick else args.tokens
    rounds, per_round = (1, 2) if args.quick else (args.rounds, 4)
    run = OUT / "run"
    if not (run / "config.json").exists():
        api.train(run, data="shakespeare", time_budget="10s" if args.quick else args.train, progress=False)

    keys = Path(tempfile.mkdtemp(prefix="trustgen-bench-keys-"))
    store = Keystore(keys)
    store.init()
    model = api.load(run)
    mark = make_watermark("kgw", store.watermark_key().secret, model.tokenizer.vocab_size)
    model.generate(PROMPT, max_new_tokens=16, seed=0, processors=[mark])  # warm up

    def api_rate() -> float:
        started = time.perf_counter()
        for seed in range(per_round):
            model.generate(PROMPT, max_new_tokens=tokens, seed=seed, temperature=0.8, processors=[mark])
        return per_round * tokens / (time.perf_counter() - started)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TRUSTGEN_KEYSTORE": str(keys)}
    command = [sys.executable, "-m", "trustgen.cli", "serve", str(run), "--port", str(port), "--max-concurrency", "16",
               "--queue-limit", "64"] + (["--threads", str(args.server_threads)] if args.server_threads else [])
    one_client = httpx.Client(timeout=300)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        process = psutil.Process(server.pid)
        stream_once(one_client, url, 16, seed=0)  # warm up
        # This machine's speed drifts from minute to minute: alternate the two, keep each one's best.
        api_rates, server_rates = [], []
        for _ in range(rounds):
            api_rates.append(api_rate())
            single = [stream_once(one_client, url, tokens, seed=s) for s in range(per_round)]
            server_rates.append(sum(r[0] for r in single) / sum(r[2] for r in single))
        best_api, single_rate = max(api_rates), max(server_rates)
        clients = 4 if args.quick else 16
        aggregate, first_tokens = concurrent_streams(url, clients, 1 if args.quick else 2, tokens)
        baseline_rss = process.memory_info().rss
        outcomes = storm(url, 50 if args.quick else 200, 16 if args.quick else 32)
        time.sleep(2)
        after_rss = process.memory_info().rss
        # A second storm tells a leak (memory grows again) from the allocator keeping what the
        # first one needed (it does not).
        again = storm(url, 50 if args.quick else 200, 16 if args.quick else 32)
        time.sleep(2)
        second_rss = process.memory_info().rss
        largest = "".join(play.text for play in shakespeare_documents())[:MAX_DETECT_CHARS]
        quiet_gap, quiet_health = stall(url, tokens, None)
        busy_gap, busy_health = stall(url, tokens, largest)
    finally:
        one_client.close()
        server.terminate()
        server.wait(timeout=30)

    print(environment())
    threads = f", server --threads {args.server_threads}" if args.server_threads else ""
    print(f"model: {run} (default character GPT), {tokens} tokens per request, temperature 0.8, kgw watermark"
          f"{threads}; rounds: API {', '.join(f'{r:,.0f}' for r in api_rates)} / server "
          f"{', '.join(f'{r:,.0f}' for r in server_rates)} tokens/s\n")
    record.table("server under load", ["what", "measured"], [
        ["Python API, one sample, tokens/s (baseline; best of rounds)", f"{best_api:,.0f}"],
        ["server, one streaming client, tokens/s (best of rounds)", f"{single_rate:,.0f}"],
        ["server overhead for one client", f"{best_api / single_rate - 1:+.1%}"],
        [f"server, {clients} concurrent streaming clients, aggregate tokens/s", f"{aggregate:,.0f}"],
        [f"{clients} clients vs one", f"{aggregate / single_rate:.2f}x"],
        [f"time to first token under {clients} clients, p50 / p99", f"{percentile(first_tokens, 0.5) * 1000:.0f} ms / "
                                                                     f"{percentile(first_tokens, 0.99) * 1000:.0f} ms"],
        [f"{sum(outcomes.values())} concurrent requests, queue limit 64", ", ".join(f"{k}: {v}" for k, v in outcomes.items())],
        ["the same again", ", ".join(f"{k}: {v}" for k, v in again.items())],
        ["server memory before / after the first / after the second", f"{baseline_rss / 2**20:,.0f} MiB / "
                                                                      f"{after_rss / 2**20:,.0f} MiB / "
                                                                      f"{second_rss / 2**20:,.0f} MiB"],
        [f"longest gap in 8 streams of {tokens} tokens, alone / beside /v1/detect of {MAX_DETECT_CHARS:,} characters",
         f"{quiet_gap * 1000:.0f} ms / {busy_gap * 1000:.0f} ms"],
        ["slowest /health answer, alone / beside that detection", f"{quiet_health * 1000:.0f} ms / "
                                                                   f"{busy_health * 1000:.0f} ms"],
    ])
    record.write()


if __name__ == "__main__":
    main()
