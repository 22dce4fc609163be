"""Every malformed request gets a 4xx JSON answer in the OpenAI error shape, nothing a client sent
is logged, and /v1/detect is capped (issue 22, point 10)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trustgen import api
from trustgen.serve import trust as trust_routes
from trustgen.serve.app import create_app, running
from trustgen.serve.schemas import APIError

PROMPT = "SECRET-PROMPT-7f3a"


@pytest.fixture(scope="module")
def url(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's tiny char GPT (conftest `run`), served."""
    app = create_app([run], keystore=tmp_path_factory.mktemp("serve-errors-keys"))
    with running(app) as base:
        yield base


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("how", [
    {"data": {"model": "run", "prompt": PROMPT}},  # a form, as `curl -d` sends
    {"content": f'{{"model": "run", "prompt": "{PROMPT}"}}', "headers": {"content-type": "text/plain"}},
    {"content": f'{{"model": "run", "prompt": "{PROMPT}"}}', "headers": {"content-type": ""}},
])
def test_a_body_not_sent_as_json_is_a_415_and_never_logged(url: str, how: dict[str, Any],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        error = _error(httpx.post(url + "/v1/completions", **how), 415)
    assert "Content-Type: application/json" in error["message"] and error["code"] == "unsupported_media_type"
    assert PROMPT not in caplog.text


def test_malformed_json_and_bad_fields_are_400s_naming_the_problem(url: str) -> None:
    broken = _error(httpx.post(url + "/v1/completions", content=b'{"model": "run", "prompt": ',
                               headers={"content-type": "application/json"}), 400)
    assert broken["code"] == "invalid_json" and broken["param"] == "body" and "not valid JSON" in broken["message"]
    assert _error(httpx.post(url + "/v1/completions", json=[1, 2]), 400)["param"] == "body"
    field = _error(httpx.post(url + "/v1/completions", json={"model": "run", "prompt": "x", "max_tokens": "many"}),
                   400)
    assert field["param"] == "max_tokens"
    assert _error(httpx.post(url + "/v1/completions", json={"model": "run"}), 400)["param"] == "prompt"


def test_unknown_routes_and_methods_answer_in_the_openai_shape(url: str) -> None:
    missing = _error(httpx.get(url + "/v1/nothing"), 404)
    assert missing["type"] == "not_found_error" and "/v1/nothing" in missing["message"]
    response = httpx.get(url + "/v1/completions")
    assert "use POST" in _error(response, 405)["message"] and response.headers["allow"] == "POST"


def test_a_server_failure_is_a_500_whose_log_holds_no_prompt(url: str, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    async def fails(function: object, text: str, keystore: object) -> None:
        raise RuntimeError(f"broken while reading {text}")

    monkeypatch.setattr(trust_routes.TrustWorker, "run", staticmethod(fails))
    with caplog.at_level(logging.DEBUG):
        error = _error(httpx.post(url + "/v1/detect", json={"text": PROMPT}), 500)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "internal error on POST /v1/detect: RuntimeError" in caplog.text
    assert PROMPT not in caplog.text


def test_detect_is_capped_at_100000_characters(url: str) -> None:
    assert trust_routes.MAX_DETECT_CHARS == 100_000  # the size docs/serving.md promises
    error = _error(httpx.post(url + "/v1/detect", json={"text": "a" * 100_001}), 413)
    assert error["param"] == "text" and "100,000" in error["message"]


def test_the_model_list_tells_the_playground_how_to_count_prompt_tokens(url: str, run: Path) -> None:
    (model,) = httpx.get(url + "/v1/models").json()["data"]
    assert model["trustgen"]["tokenizer"] == api.load(run, device="cpu").tokenizer.kind == "char"


def test_detection_runs_in_a_worker_process_that_is_replaced_when_it_dies() -> None:
    # A thread would share the interpreter lock with the event loop that runs every stream.
    worker = trust_routes.TrustWorker
    answer = asyncio.run(worker.run(trust_routes._json, {"ok": True}))
    assert json.loads(answer.body) == {"ok": True}
    assert os.getpid() not in worker._pool._processes
    with pytest.raises(APIError) as died:
        asyncio.run(worker.run(os._exit, 1))  # in a thread this would end the test run
    assert died.value.status == 500 and "detection worker stopped" in died.value.message
    assert json.loads(asyncio.run(worker.run(trust_routes._json, {"again": 1})).body) == {"again": 1}
