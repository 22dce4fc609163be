"""The playground page end to end in a real headless Chromium (Debian's, driven by Playwright).

A live server on loopback serves a tiny GPT and a tiny conditional VAE behind an API key. The
browser enters the key, streams text, stops it (and the server's scheduler must drop the
sequence before it could have finished), highlights the watermark, generates an image grid,
verifies a signed image and a signed text with its sidecar, and takes a screenshot in a narrow
window. Playwright's own browser downloads are never used: the system Chromium is.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "playground-test-key"
PROMPT = "First"
MAX_TOKENS = 10
SLOW_STEP_SECONDS = 0.3  # per decode step while testing Stop, so the stream lasts long enough to interrupt

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")]


@dataclass
class Server:
    app: Any
    url: str
    keystore: Path
    delay: dict[str, float]  # seconds added to each decode step of the text model


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.02)


@pytest.fixture
def server(run: Path, cvae: Path, tmp_path: Path) -> Iterator[Server]:
    from trustgen.serve.app import create_app, hash_key, running

    keystore = tmp_path / "keys"
    app = create_app([run, cvae], api_keys=[hash_key(KEY)], keystore=keystore)
    delay = {"seconds": 0.0}
    scheduler = app.state.models[run.name].scheduler
    decoding = scheduler.decoding

    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay["seconds"])
        return decoding.decode_step(*args, **kwargs)

    # Only this server's scheduler is slowed.
    scheduler.decoding = SimpleNamespace(prefill=decoding.prefill, batch_cache=decoding.batch_cache,
                                         decode_step=slowed)
    with running(app) as url:
        yield Server(app, url, keystore, delay)


def watched_page(browser: Any, problems: list[str]) -> Any:
    """A new page whose script errors and console errors are appended to `problems`."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(10_000)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    # Refused requests (the 401 before the key is entered, a 400) are logged as "Failed to load
    # resource"; anything else in red (a script error, a CSP violation) is a failure.
    page.on("console", lambda m: problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    return page


def _signed_text(folder: Path, keystore: Path) -> tuple[Path, Path]:
    from trustgen.safety.keys import Keystore
    from trustgen.safety.provenance import generation_claim, sign_text

    path = folder / "speech.txt"
    path.write_text("Speak, speak. We are all resolved rather to die than to famish.\n", encoding="utf-8")
    claim = generation_claim(model_id="0" * 64, family="gpt", settings={}, seed=3, watermark=None)
    return path, sign_text(path, claim, Keystore(keystore).signing_identity())


def test_playground_in_chromium(server: Server, run: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    entry = server.app.state.models[run.name]
    scheduler = entry.scheduler
    assert len(entry.model.encode_prompt(PROMPT)) + MAX_TOKENS <= scheduler.capacity
    problems: list[str] = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = watched_page(browser, problems)

            # -- the key: without it the server refuses, and the page says so -------------------
            page.goto(server.url + "/")
            status = page.locator("#status")
            expect(status).to_contain_text("API key")
            expect(status).to_have_class("status error")
            page.fill("#api-key", KEY)
            page.get_by_role("button", name="Use key").click()
            expect(status).to_contain_text(f"Serving {run.name}")
            assert page.evaluate("sessionStorage.getItem('trustgen.apiKey')") == KEY
            assert page.evaluate("localStorage.length") == 0

            # -- stream, then stop: the server must drop the sequence ------------------------------
            server.delay["seconds"] = SLOW_STEP_SECONDS
            page.select_option("#text-model", run.name)
            # Max tokens is bounded by the context the prompt leaves (a char model: one token a character).
            long_prompt = "a" * (scheduler.capacity - 3)
            page.fill("#prompt", long_prompt)
            assert page.eval_on_selector("#max-tokens", "el => Number(el.max)") == 3
            page.fill("#prompt", PROMPT)
            page.eval_on_selector("#max-tokens", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                                  str(MAX_TOKENS))
            expect(page.locator("#max-tokens-value")).to_have_text(str(MAX_TOKENS))
            page.fill("#seed", "7")
            page.get_by_role("button", name="Generate").click()
            output = page.locator("#output")
            page.wait_for_function("() => document.getElementById('output').textContent.length > 0")
            shown = len(output.text_content())
            page.wait_for_function("n => document.getElementById('output').textContent.length > n", arg=shown)
            expect(page.locator("#speed")).to_contain_text("tokens/s")
            page.get_by_role("button", name="Stop").click()
            expect(status).to_contain_text("Stopped")
            _wait_until(lambda: scheduler.running_count == 0)
            # It left the batch early: running to the end takes MAX_TOKENS tokens (no stop strings).
            assert scheduler.generated_tokens < MAX_TOKENS
            assert scheduler.queue_length == 0
            expect(page.locator("#generate")).to_be_enabled()

            # -- a whole generation, then its watermark highlighted ---------------------------------
            server.delay["seconds"] = 0.0
            page.get_by_role("button", name="Generate").click()
            expect(status).to_contain_text("Done")
            generated = output.text_content()
            assert generated
            page.get_by_label("Highlight watermark").check()
            expect(page.locator("#verdict")).to_contain_text("p-value")
            tokens = page.locator("#output span.tok")
            assert tokens.count() > 0
            assert page.locator("#output span.tok.green").count() >= 1
            assert output.text_content() == generated  # the spans carry exactly the text
            expect(page.locator("#legend")).to_be_visible()
            page.get_by_label("Highlight watermark").uncheck()
            expect(page.locator("#output span.tok")).to_have_count(0)
            expect(page.locator("#legend")).to_be_hidden()

            # -- an image grid ---------------------------------------------------------------------
            page.get_by_role("tab", name="Image").click()
            page.select_option("#image-model", "cvae")
            page.select_option("#image-prompt", "3")
            page.fill("#image-n", "4")
            page.fill("#image-seed", "1")
            page.locator("#image-generate").click()
            images = page.locator("#grid img")
            expect(images).to_have_count(4)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")
            png = base64.b64decode(images.first.get_attribute("src").split(",", 1)[1])
            assert png.startswith(b"\x89PNG")

            # -- verify: a signed image, then a signed text with its sidecar -----------------------
            page.get_by_role("tab", name="Verify").click()
            summary = page.locator("#verify-summary")
            page.set_input_files("#verify-files", files=[{"name": "digit.png", "mimeType": "image/png",
                                                          "buffer": png}])
            expect(summary).to_contain_text("digit.png: verified: signed by")
            expect(summary).to_contain_text("content unmodified")
            expect(page.locator("#verify-fields")).to_contain_text("trusted")
            text, sidecar = _signed_text(tmp_path, server.keystore)
            page.set_input_files("#verify-files", files=[str(sidecar), str(text)])
            expect(summary).to_contain_text("speech.txt: verified: signed by")
            expect(summary).to_contain_text("content unmodified")
            expect(page.locator("#verify-fields")).to_contain_text(sidecar.name)

            # -- a narrow window: nothing overflows sideways; the screenshot ------------------------
            page.get_by_role("tab", name="Text").click()
            page.set_viewport_size({"width": 380, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert not problems, problems
