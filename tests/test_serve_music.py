"""`/v1/audio/generations`: a music run served as signed, watermarked WAV, MIDI and piano roll;
text routes and bad bodies refused in the OpenAI error shape."""

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from trustgen.data import music
from trustgen.safety.trust import sidecar_path, verify
from trustgen.serve.app import create_app

# The tests that use `served` are slow: its fixture trains a tiny music run (~10 s).


@pytest.fixture(scope="module")
def served(music_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    keystore = tmp_path_factory.mktemp("music-serve-keys")
    with TestClient(create_app([music_run], keystore=keystore)) as client:
        yield client, keystore


@pytest.mark.slow
def test_music_comes_as_signed_wav_midi_and_piano_roll(served: tuple[TestClient, Path], tmp_path: Path) -> None:
    client, keystore = served
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["trustgen"]["kind"]) for m in listed] == [("run", "music")]
    answer = client.post("/v1/audio/generations", json={"model": "run", "n": 2, "bars": 2, "seed": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["data"]) == 2 and body["trustgen"]["watermark"]["scheme"] == "kgw"
    piece = body["data"][0]
    wav = tmp_path / "piece.wav"
    wav.write_bytes(base64.b64decode(piece["wav_b64"]))
    report = verify(wav, keystore)
    assert report["status"] == "verified", report
    # Three training steps make noise too busy to carry the audio mark: the WAV then says why, and never claims it.
    assert (piece["trustgen"]["audio_watermark"] is None) == (piece["trustgen"]["audio_watermark_note"] is not None)
    midi = tmp_path / "piece.mid"
    midi.write_bytes(base64.b64decode(piece["midi_b64"]))
    assert music.read_score(midi).grid.shape[1] == 4
    sidecar_path(midi).write_text(piece["midi_manifest"], encoding="utf-8")  # the signed sidecar, as text
    assert verify(midi, keystore)["status"] == "verified"
    assert base64.b64decode(piece["piano_roll_png_b64"]).startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_melody_is_harmonized_and_midi_alone_skips_the_audio(served: tuple[TestClient, Path],
                                                                tmp_path: Path) -> None:
    client, _ = served
    answer = client.post("/v1/audio/generations", json={"model": "run", "prompt": "67:4 69:4 71:8",
                                                        "response_format": "midi", "seed": 0})
    assert answer.status_code == 200, answer.text
    piece = answer.json()["data"][0]
    assert "wav_b64" not in piece
    midi = tmp_path / "harmonized.mid"
    midi.write_bytes(base64.b64decode(piece["midi_b64"]))
    assert music.read_score(midi).voice_notes()[0] == [(0, 4, 67), (4, 4, 69), (8, 8, 71)]


@pytest.mark.slow
def test_wrong_routes_and_bad_bodies_get_400_in_the_openai_shape(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    refused = client.post("/v1/completions", json={"model": "run", "prompt": "hello"})
    assert refused.status_code == 400 and "/v1/audio/generations" in refused.json()["error"]["message"]
    for body, param in (({"model": "run", "n": 9}, "n"), ({"model": "run", "response_format": "mp3"}, "response_format"),
                        ({"model": "run", "prompt": "67:x"}, "prompt"),
                        ({"model": "run", "prompt": "/etc/passwd.mid"}, "prompt"),
                        ({"model": "run", "prompt": "60:9999999999"}, "prompt"),  # refused before 80 GB of grid
                        ({"model": "run", "prompt": "60:16 " * 32 + "r:1"}, "prompt")):
        answer = client.post("/v1/audio/generations", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["param"] == param and answer.json()["error"]["type"] == "invalid_request_error"
    broken = client.post("/v1/verify", json={"filename": "take.wav", "content": base64.b64encode(b"not audio").decode()})
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith("take.wav is named like a WAV file")
    missing = client.post("/v1/audio/generations", json={"model": "nope"})
    assert missing.status_code == 404 and "the music models here are: run" in missing.json()["error"]["message"]


def test_the_playground_has_a_music_tab_that_may_play_data_urls(tmp_path: Path) -> None:
    with TestClient(create_app([], keystore=tmp_path / "keys")) as client:
        page = client.get("/")
        script = client.get("/playground.js").text
    assert "media-src data:" in page.headers["content-security-policy"] and "media-src data:" in page.text
    assert 'id="tab-music"' in page.text and 'id="music-form"' in page.text
    assert "/v1/audio/generations" in script and "data:audio/wav;base64," in script
