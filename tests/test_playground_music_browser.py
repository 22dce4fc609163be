"""The playground's Music tab end to end in a real headless Chromium (Debian's, driven by Playwright).

A live server on loopback serves the tiny music run. The browser opens the Music tab, composes a
piece, and must be able to play its WAV (Chromium decodes it and reports a duration), draw its piano
roll, and show the watermark lines the server returned; the WAV it was given verifies as signed in
the Verify tab, and so does the MIDI file with the manifest the page offers beside it. A malformed
melody shows the server's own sentence; bars out of range are refused by the form before any request.
"""

from __future__ import annotations

import base64
import io
import json
import re
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.test_playground_browser import CHROMIUM, CHROMIUM_ARGS, watched_page

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")]


@pytest.fixture
def served(music_run: Path, tmp_path: Path) -> Iterator[str]:
    from trustgen.serve.app import create_app, running

    with running(create_app([music_run], keystore=tmp_path / "keys")) as url:
        yield url


def _expected_caption(piece: dict[str, Any]) -> str:
    """The watermark lines the page should show for a piece, built from the server's answer."""
    marks = piece["trustgen"]
    lines = [f"notes watermarked {marks['watermark']['scheme']}, key {marks['watermark']['key_id']}"]
    audio = marks["audio_watermark"]
    lines.append(f"audio watermarked {audio['scheme']}, key {audio['key_id']}" if audio
                 else f"audio: {marks['audio_watermark_note']}")
    return " · ".join(lines)


def _data_url_bytes(url: str) -> bytes:
    head, payload = url.split(",", 1)
    return base64.b64decode(payload) if head.endswith(";base64") else unquote(payload).encode()


def test_music_tab_in_chromium(served: str, music_run: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = watched_page(browser, problems)
            page.goto(served + "/")
            status = page.locator("#status")
            expect(status).to_contain_text(f"Serving {music_run.name}")

            # -- compose: the page shows what the server sent, and the browser can play it ----------
            page.get_by_role("tab", name="Music").click()
            expect(page.locator("#panel-music")).to_be_visible()
            page.fill("#music-bars", "2")
            page.fill("#music-seed", "3")
            with page.expect_response("**/v1/audio/generations") as answer:
                page.locator("#music-generate").click()
            assert answer.value.status == 200
            piece = answer.value.json()["data"][0]
            expect(status).to_have_text("Music ready.")
            expect(page.locator("#pieces figure")).to_have_count(1)
            player = page.locator("#pieces audio")
            source = player.get_attribute("src")
            assert source.startswith("data:audio/wav;base64,")
            with wave.open(io.BytesIO(_data_url_bytes(source))) as wav:
                assert wav.getframerate() == 44_100 and wav.getnframes() > 0
                seconds = wav.getnframes() / wav.getframerate()
            # Chromium decoded the header: the player knows how long the piece lasts.
            page.wait_for_function("() => { const a = document.querySelector('#pieces audio');"
                                   " return a.readyState >= 1 && a.duration > 0; }")
            assert player.evaluate("a => a.duration") == pytest.approx(seconds, abs=0.01)
            assert player.evaluate("a => a.error") is None
            page.wait_for_function("() => { const i = document.querySelector('#pieces img');"
                                   " return i.complete && i.naturalWidth > 0; }")
            assert _data_url_bytes(page.locator("#pieces img").get_attribute("src")).startswith(b"\x89PNG")
            expect(page.locator("#pieces figcaption")).to_have_text(_expected_caption(piece))
            expect(page.locator("#music-info")).to_contain_text("1 signed piece(s)")

            # -- what the page offers to save verifies as signed --------------------------------------
            links = {a.get_attribute("download").split(".", 1)[1]: a.get_attribute("href")
                     for a in page.locator("#pieces figure a").all()}
            assert set(links) == {"wav", "mid", "mid.manifest.json"}
            assert json.loads(_data_url_bytes(links["mid.manifest.json"])) == json.loads(piece["midi_manifest"])
            page.get_by_role("tab", name="Verify").click()
            summary = page.locator("#verify-summary")
            page.set_input_files("#verify-files", files=[{"name": "piece.wav", "mimeType": "audio/wav",
                                                          "buffer": _data_url_bytes(links["wav"])}])
            expect(summary).to_contain_text("piece.wav: verified: signed by")
            page.set_input_files("#verify-files", files=[
                {"name": "piece.mid", "mimeType": "audio/midi", "buffer": _data_url_bytes(links["mid"])},
                {"name": "piece.mid.manifest.json", "mimeType": "application/json",
                 "buffer": _data_url_bytes(links["mid.manifest.json"])}])
            expect(summary).to_contain_text("piece.mid: verified: signed by")
            expect(page.locator("#verify-fields")).to_contain_text("kgw")

            # -- bad input: the form refuses bars out of range; the server's sentence for a bad melody -
            page.get_by_role("tab", name="Music").click()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.fill("#music-bars", "40")
            page.locator("#music-generate").click()
            assert not page.eval_on_selector("#music-bars", "el => el.checkValidity()")
            page.fill("#music-melody", "67:4 69:x")
            expect(page.locator("#music-bars")).to_be_disabled()  # a harmonization lasts as long as its melody
            with page.expect_response("**/v1/audio/generations") as refused:
                page.locator("#music-generate").click()
            assert refused.value.status == 400
            assert [url for url in requests if "/v1/" in url] == [refused.value.url]
            expect(status).to_have_text(refused.value.json()["error"]["message"])
            expect(status).to_have_class("status error")
            expect(page.locator("#pieces figure")).to_have_count(1)  # the last piece stays
            expect(page.locator("#music-generate")).to_be_enabled()

            # -- a melody harmonized: one bar, whatever the (disabled) bars field says ------------------
            page.fill("#music-melody", "67:4 69:4 71:8")
            with page.expect_response("**/v1/audio/generations") as harmonized:
                page.locator("#music-generate").click()
            assert harmonized.value.status == 200
            assert json.loads(harmonized.value.request.post_data) == {"model": music_run.name, "n": 1,
                                                                      "prompt": "67:4 69:4 71:8", "seed": 3}
            expect(status).to_have_text("Music ready.")
            expect(page.locator("#pieces img")).to_have_attribute("alt", re.compile(r": 1 bar\(s\)"))

            # -- a narrow window: nothing overflows sideways ----------------------------------------------
            page.set_viewport_size({"width": 380, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        finally:
            browser.close()
    assert not problems, problems
