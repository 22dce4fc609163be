"""The audio watermark: found in a rendered piece after each edit the issue lists (resampling to
22.05 kHz, an 8 kHz low-pass, noise at 20 dB SNR, ±6 dB, a 10 s crop), never in unmarked audio
nor under another key, at an SNR of at least 35 dB."""

import numpy as np
import pytest
from scipy import signal

from trustgen.data.music import chorale_from_notes
from trustgen.safety.watermark import audio
from trustgen.sample.music import SAMPLE_RATE, read_wav, synthesize, wav_bytes

KEY = {"k1": bytes(range(32))}


def piece(seed: int, steps: int = 80) -> np.ndarray:
    """A 15 s four-voice piece of random notes in the voices' ranges, rendered as trustgen does."""
    rng = np.random.default_rng(seed)
    voices = []
    for low, high in ((60, 81), (55, 74), (48, 69), (40, 62)):
        notes, onset = [], 0
        while onset < steps:
            length = int(rng.choice([2, 4, 4, 8]))
            notes.append((onset, min(length, steps - onset), int(rng.integers(low, high))))
            onset += length
        voices.append(notes)
    return synthesize(chorale_from_notes(f"random-{seed}", voices, length=steps))


def as_wav(audio_: np.ndarray, rate: int) -> np.ndarray:
    """Through a 16-bit WAV, clipped as a file would be."""
    return read_wav(wav_bytes(audio_, rate))[0]


EDITS = {
    "resampled to 22.05 kHz": lambda x, rng: (signal.resample_poly(x, 1, 2), SAMPLE_RATE // 2),
    "low-passed at 8 kHz": lambda x, rng: (signal.sosfilt(signal.butter(8, 8000, fs=SAMPLE_RATE, output="sos"), x),
                                           SAMPLE_RATE),
    "noise at 20 dB SNR": lambda x, rng: (x + rng.normal(0, np.sqrt(np.mean(x ** 2) / 100), len(x)), SAMPLE_RATE),
    "+6 dB": lambda x, rng: (x * 2, SAMPLE_RATE),
    "-6 dB": lambda x, rng: (x / 2, SAMPLE_RATE),
    "cropped to 10 s": lambda x, rng: (x[3 * SAMPLE_RATE + 1234: 13 * SAMPLE_RATE + 1234], SAMPLE_RATE),
}


@pytest.fixture(scope="module")
def marked() -> tuple[np.ndarray, np.ndarray]:
    original = piece(0)
    return original, audio.embed(original, SAMPLE_RATE, KEY["k1"])


def test_the_mark_is_quiet_and_found(marked: tuple[np.ndarray, np.ndarray]) -> None:
    original, watermarked = marked
    assert audio.snr_db(original, watermarked) >= 35
    found = audio.detect(as_wav(watermarked, SAMPLE_RATE), SAMPLE_RATE, KEY)
    assert found.verdict == "watermarked" and found.key_id == "k1" and found.p_value < 1e-6


@pytest.mark.parametrize("edit", EDITS)
def test_the_mark_survives(marked: tuple[np.ndarray, np.ndarray], edit: str) -> None:
    edited, rate = EDITS[edit](marked[1].astype(np.float64), np.random.default_rng(1))
    assert audio.detect(as_wav(edited, rate), rate, KEY).verdict == "watermarked"


def test_unmarked_audio_and_other_keys_are_not_found(marked: tuple[np.ndarray, np.ndarray]) -> None:
    rng = np.random.default_rng(2)
    sweep = signal.chirp(np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE, 100, 10, 6000).astype(np.float32) * 0.3
    for clean in (marked[0], piece(3), sweep, rng.normal(0, 0.1, 5 * SAMPLE_RATE).astype(np.float32)):
        assert audio.detect(as_wav(clean, SAMPLE_RATE), SAMPLE_RATE, KEY).verdict == "no watermark found"
    other = {"k2": bytes(range(1, 33))}
    assert audio.detect(marked[1], SAMPLE_RATE, other).verdict == "no watermark found"


def test_silence_and_short_audio_get_no_false_verdict() -> None:
    assert audio.detect(np.zeros(3 * SAMPLE_RATE), SAMPLE_RATE, KEY).verdict == "no watermark found"
    assert audio.detect(piece(4, steps=4), SAMPLE_RATE, KEY).verdict == "too short to tell"
    silent = np.zeros(SAMPLE_RATE, dtype=np.float32)
    assert np.array_equal(audio.embed(silent, SAMPLE_RATE, KEY["k1"]), silent)
