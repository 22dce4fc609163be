"""The HTTP server against the official `openai` client on loopback: completions, chat,
streaming, errors, auth, cancellation on disconnect, batching equivalence, images, detect, verify."""

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.test_provenance import with_one_pixel_changed
from trustgen import api
from trustgen.serve.app import create_app, hash_key, running

KEY = "tg-test-key-0123456789"


@pytest.fixture(scope="module")
def textrun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT with a context long enough for watermark detection (128 characters)."""
    from tests.conftest import tiny_corpus

    root = tmp_path_factory.mktemp("serve")
    api.train(root / "shk", data=str(tiny_corpus(root / "data")), model_config={"n_layer": 1, "n_head": 2, "n_embd": 16,
                                                                    "block_size": 128},
              max_steps=8, batch_size=8, progress=False)
    return root / "shk"


@pytest.fixture(scope="module")
def server(textrun: Path, cvae: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    keystore = tmp_path_factory.mktemp("serve-keys")
    app = create_app([textrun, cvae], api_keys=[hash_key(KEY)], keystore=keystore, max_batch=8, max_queue=64)
    with running(app) as url:
        yield url, app


@pytest.fixture
def client(server: tuple[str, object]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_models_are_listed(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"shk", "cvae"}
    assert models["shk"].model_extra["trustgen"]["kind"] == "text"
    assert models["cvae"].model_extra["trustgen"]["classes"] == list("0123456789")


def test_a_completion_is_watermarked_reproducible_and_carries_its_manifest(client: openai.OpenAI) -> None:
    first = client.completions.create(model="shk", prompt="All:", max_tokens=40, seed=3)
    again = client.completions.create(model="shk", prompt="All:", max_tokens=40, seed=3)
    assert first.choices[0].text == again.choices[0].text and len(first.choices[0].text) > 10
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == 4 and first.usage.completion_tokens == 40
    manifest = first.model_extra["trustgen"]
    assert manifest["watermark"]["scheme"] == "kgw" and len(manifest["model_id"]) == 64
    plain = client.completions.create(model="shk", prompt="All:", max_tokens=40, seed=3,
                                      extra_body={"watermark": "none"})
    assert plain.model_extra["trustgen"]["watermark"] is None


def test_n_stop_and_logprobs(client: openai.OpenAI) -> None:
    several = client.completions.create(model="shk", prompt="All:", max_tokens=20, n=3, seed=1, logprobs=2)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert len({c.text for c in several.choices}) > 1  # each choice has its own seed
    logprobs = several.choices[0].logprobs
    assert len(logprobs.tokens) == 20 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    text = client.completions.create(model="shk", prompt="All:", max_tokens=60, seed=5).choices[0].text
    stop = next(c for c in text[5:] if c.strip())
    stopped = client.completions.create(model="shk", prompt="All:", max_tokens=60, seed=5, stop=stop)
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_streaming_matches_the_whole_answer_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="shk", prompt="All:", max_tokens=30, seed=9).choices[0].text
    chunks = list(client.completions.create(model="shk", prompt="All:", max_tokens=30, seed=9, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("interval", [0.0, 1.0])
def test_a_stream_sends_its_first_token_alone_then_what_each_interval_generated(
        textrun: Path, tmp_path: Path, interval: float) -> None:
    with running(create_app([textrun], keystore=tmp_path / "keys", stream_interval=interval)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        whole = client.completions.create(model="shk", prompt="All:", max_tokens=40, seed=4, logprobs=1).choices[0]
        chunks = [c.choices[0] for c in client.completions.create(
            model="shk", prompt="All:", max_tokens=40, seed=4, logprobs=1, stream=True)]
    texts = [c.text for c in chunks if c.text]
    assert "".join(texts) == whole.text
    streamed_tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert streamed_tokens == whole.logprobs.tokens and len(streamed_tokens) == 40
    # The first token is not held back: it goes out with at most the token decoded in the same
    # turn of the scheduler (the prompt's prefill gives one, the first batched step the next).
    assert len(chunks[0].logprobs.tokens) <= 2
    if interval == 0:
        assert len(texts) == 40  # one chunk per character
    else:  # the tiny model generates 40 tokens in far less than a second: the rest come together
        assert len(texts) <= 3
    assert chunks[-1].finish_reason == "length"


def test_continuous_usage_stats_count_the_tokens_so_far_in_every_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="shk", prompt="All:", max_tokens=30, seed=6, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 30
    assert all(c.usage.prompt_tokens == 4 for c in chunks)


def test_chat_uses_the_template_and_streams(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Speak, speak."}]
    reply = client.chat.completions.create(model="shk", messages=messages, max_tokens=30, seed=2)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    streamed = client.chat.completions.create(model="shk", messages=messages, max_tokens=30, seed=2, stream=True)
    parts = [c.choices[0].delta.content or "" for c in streamed]
    assert "".join(parts) == reply.choices[0].message.content
    scored = client.chat.completions.create(model="shk", messages=messages, max_tokens=30, seed=2, logprobs=True,
                                            top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content).startswith(scored.choices[0].message.content)


def test_the_same_seed_gives_the_same_text_alone_or_in_a_batch(client: openai.OpenAI,
                                                                 server: tuple[str, object]) -> None:
    alone = client.completions.create(model="shk", prompt="First", max_tokens=60, seed=11).choices[0].text
    results: dict[int, str] = {}

    def ask(seed: int) -> None:
        results[seed] = client.completions.create(model="shk", prompt="All:" if seed % 2 else "Speak",
                                                  max_tokens=40 + seed, seed=seed).choices[0].text

    others = [threading.Thread(target=ask, args=(s,)) for s in range(1, 8)]
    for t in others:
        t.start()
    time.sleep(0.05)  # the target joins a batch that is already decoding
    in_batch = client.completions.create(model="shk", prompt="First", max_tokens=60, seed=11).choices[0].text
    for t in others:
        t.join()
    assert in_batch == alone and len(results) == 7
    scheduler = server[1].state.models["shk"].scheduler
    assert scheduler.decode_steps > 0


def test_a_client_that_disconnects_stops_the_decoding(server: tuple[str, object]) -> None:
    url, app = server
    scheduler = app.state.models["shk"].scheduler
    body = {"model": "shk", "prompt": "All:", "max_tokens": 120, "stream": True, "seed": 1}
    with httpx.Client(timeout=10) as http, http.stream("POST", url + "/v1/completions", json=body,
                                                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        before = scheduler.decode_steps
    deadline = time.monotonic() + 5
    while scheduler.running_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.running_count == 0
    settled = scheduler.decode_steps
    time.sleep(0.2)
    assert scheduler.decode_steps == settled  # no more steps for the abandoned sequence
    assert settled - before < 118  # it did not run to its 120 tokens


def test_errors_say_exactly_what_was_wrong(client: openai.OpenAI, server: tuple[str, object]) -> None:
    with pytest.raises(openai.NotFoundError, match=r"'nope' does not exist.*shk"):
        client.completions.create(model="nope", prompt="x", max_tokens=5)
    with pytest.raises(openai.BadRequestError, match=r"temperature.*less than or equal to 2"):
        client.completions.create(model="shk", prompt="All:", max_tokens=5, temperature=3)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 128 tokens") as too_long:
        client.completions.create(model="shk", prompt="All:", max_tokens=500)
    assert too_long.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match=r"n: .*less than or equal to 16"):
        client.completions.create(model="shk", prompt="All:", max_tokens=5, n=50)
    with pytest.raises(openai.BadRequestError, match="never saw"):
        client.completions.create(model="shk", prompt="ZQXJ", max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="image model"):
        client.completions.create(model="cvae", prompt="7", max_tokens=5)
    huge = httpx.post(server[0] + "/v1/completions", content=b"x" * (17 << 20),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert huge.status_code == 413 and "larger than the limit" in huge.json()["error"]["message"]


def test_every_route_but_health_needs_the_key(server: tuple[str, object]) -> None:
    url = server[0]
    assert httpx.get(url + "/health").status_code == 200
    page = httpx.get(url + "/")  # the page is static and holds no data; it asks for the key
    assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    routes = [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/images/generations"), ("POST", "/v1/detect"), ("POST", "/v1/verify")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, url + path, headers=headers, json={})
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_metrics_report_queue_batch_tokens_and_latency(client: openai.OpenAI, server: tuple[str, object]) -> None:
    client.completions.create(model="shk", prompt="All:", max_tokens=10, seed=1)
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("trustgen_queue_length{", "trustgen_running_sequences{", "trustgen_generated_tokens_total{",
                 "trustgen_tokens_per_second{", "trustgen_request_seconds_bucket{",
                 "trustgen_time_to_first_token_seconds_bucket{"):
        assert name in text, name
    tokens = next(line for line in text.splitlines() if line.startswith('trustgen_generated_tokens_total{model="shk"}'))
    assert float(tokens.split()[-1]) >= 10


def test_detect_finds_the_watermark_in_served_text_and_not_in_plain_text(client: openai.OpenAI,
                                                                          server: tuple[str, object]) -> None:
    marked = client.completions.create(model="shk", prompt="All:", max_tokens=120, seed=4).choices[0].text
    plain = client.completions.create(model="shk", prompt="All:", max_tokens=120, seed=4,
                                      extra_body={"watermark": "none"}).choices[0].text
    auth = {"Authorization": f"Bearer {KEY}"}
    found = httpx.post(server[0] + "/v1/detect", json={"text": marked}, headers=auth).json()
    assert found["verdict"] == "watermarked" and found["scheme"] == "kgw"
    assert found["tampering"] == {"invisible_removed": 0, "confusables_folded": 0, "tampering_suspected": False}
    hidden = httpx.post(server[0] + "/v1/detect", json={"text": "\u200b".join(marked)}, headers=auth).json()
    assert hidden["verdict"] == "watermarked" and hidden["tampering"]["invisible_removed"] == len(marked) - 1
    assert "".join(t["text"] for t in found["tokens"]) == marked and any(t["green"] for t in found["tokens"])
    assert httpx.post(server[0] + "/v1/detect", json={"text": plain}, headers=auth).json()["verdict"] != "watermarked"
    bad = httpx.post(server[0] + "/v1/detect", json={"text": "a", "image": "b"}, headers=auth)
    assert bad.status_code == 400 and "exactly one" in bad.json()["error"]["message"]


def test_images_come_signed_and_watermarked_and_verify(client: openai.OpenAI, server: tuple[str, object]) -> None:
    result = client.images.generate(model="cvae", prompt="7", n=2, extra_body={"seed": 1})
    assert len(result.data) == 2
    png = base64.b64decode(result.data[0].b64_json)
    assert png.startswith(b"\x89PNG")
    auth = {"Authorization": f"Bearer {KEY}"}
    report = httpx.post(server[0] + "/v1/verify", json={"filename": "seven.png", "content": result.data[0].b64_json},
                        headers=auth).json()
    assert report["status"] == "verified" and report["content"] == "unmodified"
    assert report["file"] == "seven.png"
    # The 8x8 digits cannot carry the spectral mark: neither the response nor the manifest claims it.
    assert result.model_extra["trustgen"]["watermark"] is None and report["claim"]["watermark"] is None
    assert "too small" in result.model_extra["trustgen"]["watermark_note"]
    assert "too small" in report["claim"]["watermark_note"]
    # One pixel edited: the same JSON as `trustgen verify`, fail-closed, with HTTP 200 (the verdict is
    # in the body; the request itself succeeded).
    edited = base64.b64encode(with_one_pixel_changed(png)).decode()
    tampered = httpx.post(server[0] + "/v1/verify", json={"filename": "seven.png", "content": edited}, headers=auth)
    assert tampered.status_code == 200
    assert (tampered.json()["status"], tampered.json()["content"]) == ("modified", "modified")
    assert tampered.json()["summary"].startswith("seven.png: modified: content modified since")
    with pytest.raises(openai.BadRequestError, match="unknown label 'eleven'"):
        client.images.generate(model="cvae", prompt="eleven")
    detected = httpx.post(server[0] + "/v1/detect", json={"image": result.data[0].b64_json}, headers=auth).json()
    assert detected["kind"] == "image" and "verdict" in detected  # 8x8 pixels: too small to carry it
    garbage = base64.b64encode(b"not a picture at all").decode()
    refused = httpx.post(server[0] + "/v1/detect", json={"image": garbage}, headers=auth)
    assert refused.status_code == 400 and "not an image" in refused.json()["error"]["message"]


def test_neither_prompts_nor_keys_are_logged(textrun: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app([textrun], api_keys=[hash_key(KEY)], keystore=tmp_path / "keys")
    secret_prompt = "Speak, speak, all."
    with caplog.at_level(logging.DEBUG), running(app) as url:
        http = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        http.completions.create(model="shk", prompt=secret_prompt, max_tokens=5)
        httpx.get(url + "/v1/models", headers={"Authorization": "Bearer not-the-key"})
    assert secret_prompt not in caplog.text and KEY not in caplog.text and "not-the-key" not in caplog.text


def test_per_key_rate_limit_and_a_full_queue_answer_429(textrun: Path, tmp_path: Path) -> None:
    app = create_app([textrun], api_keys=[hash_key(KEY)], keystore=tmp_path / "keys", rate_limit=3)
    with running(app) as url:
        auth = {"Authorization": f"Bearer {KEY}"}
        codes = [httpx.get(url + "/v1/models", headers=auth).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = httpx.get(url + "/v1/models", headers=auth)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    app = create_app([textrun], keystore=tmp_path / "keys", max_batch=1, max_queue=1)
    with running(app) as url:
        codes: list[int] = []

        def ask() -> None:
            body = {"model": "shk", "prompt": "All:", "max_tokens": 120}
            codes.append(httpx.post(url + "/v1/completions", json=body, timeout=30).status_code)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(set(codes)) == [200, 429] and codes.count(200) >= 2


@pytest.mark.slow
def test_serve_refuses_bad_arguments(tmp_path: Path) -> None:
    from tests.test_cli import assert_clear_error, trustgen

    assert_clear_error(trustgen("serve", str(tmp_path)), "not a run directory")
    keys = tmp_path / "keys.txt"
    keys.write_text("# nothing\n")
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert_clear_error(trustgen("serve", str(tmp_path), "--api-key-file", str(keys)), "holds no key")
    keys.write_text("# a hash, then something that only looks like one\nsha256:" + "ab" * 32 + "\nsha256:my-secret\n")
    result = trustgen("serve", str(tmp_path), "--api-key-file", str(keys))
    assert_clear_error(result, "line 3 of the API key file")
    assert "my-secret" not in result.stdout + result.stderr


@pytest.mark.slow
def test_streaming_never_splits_a_multi_byte_character(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.txt").write_text("Café, naïve señor — 日本語のテキスト. Ünïcödé ✓ déjà vu.\n" * 40, encoding="utf-8")
    api.train(tmp_path / "bytes", data=str(data), tokenizer="byte", max_steps=30, batch_size=8, progress=False,
              model_config={"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 128})
    # Interval 0: every token is its own chunk, so every possible cut is tried.
    with running(create_app([tmp_path / "bytes"], keystore=tmp_path / "keys", stream_interval=0)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        for seed in range(3):
            pieces = [c.choices[0].text for c in client.completions.create(
                model="bytes", prompt="日本", max_tokens=100, seed=seed, stream=True) if c.choices]
            whole = client.completions.create(model="bytes", prompt="日本", max_tokens=100, seed=seed).choices[0].text
            assert "".join(pieces) == whole
            assert any(ord(ch) > 127 for ch in whole)  # it did produce multi-byte characters
            # a character cut in two would show up as U+FFFD in the pieces but not in the whole
            assert sum(p.count("\ufffd") for p in pieces) == whole.count("\ufffd")


def test_a_failing_step_ends_its_requests_with_a_clear_error_and_the_server_goes_on(textrun: Path,
                                                                                   tmp_path: Path) -> None:
    app = create_app([textrun], keystore=tmp_path / "keys")
    scheduler = app.state.models["shk"].scheduler
    decoding = scheduler.decoding
    failures = iter([True])

    def flaky_step(model, tokens, cache):  # the first decode step fails, later ones work
        if next(failures, False):
            raise RuntimeError("simulated failure")
        return decoding.decode_step(model, tokens, cache)

    scheduler.decoding = SimpleNamespace(prefill=decoding.prefill, batch_cache=decoding.batch_cache,
                                         decode_step=flaky_step)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="generation failed on the server"):
            client.completions.create(model="shk", prompt="All:", max_tokens=20)
        assert len(client.completions.create(model="shk", prompt="All:", max_tokens=20).choices[0].text) > 0


def test_what_review_found(textrun: Path, tmp_path: Path) -> None:
    """Huge seeds are refused alone; a chat without max_tokens fits the context; echo; a request
    larger than the server is a 400; odd file names verify; a slow rate limit still admits."""
    from trustgen.serve.app import RateLimiter, SharedChains

    app = create_app([textrun], keystore=tmp_path / "keys", max_batch=2, max_queue=2)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.completions.create(model="shk", prompt="All:", max_tokens=5, seed=2**64)
        reply = client.chat.completions.create(model="shk", messages=[{"role": "user", "content": "Speak."}], seed=1)
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 128
        echoed = client.completions.create(model="shk", prompt="All:", max_tokens=5, seed=1, echo=True)
        assert echoed.choices[0].text.startswith("All:") and len(echoed.choices[0].text) == 9
        with pytest.raises(openai.BadRequestError, match="takes at most 4 at once"):
            client.completions.create(model="shk", prompt=["All:"] * 5, max_tokens=5)
        odd = httpx.post(url + "/v1/verify", json={"filename": "a\u0000b.txt", "content": base64.b64encode(b"hi").decode()})
        assert odd.status_code == 200 and odd.json()["status"] == "missing"
    assert RateLimiter(0.5).allow("k") == 0  # one request, then a wait of two minutes
    shared = SharedChains()
    config = api.sample_config({"temperature": 0.8})
    assert shared.get("a", config, "kgw", list) is shared.get("a", config, "kgw", list)
    assert shared.get("a", config, "kgw", list) is not shared.get("b", config, "kgw", list)  # another model's vocabulary
