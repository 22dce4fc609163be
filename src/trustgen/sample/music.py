"""Sampling and rendering four-voice music: the grammar that keeps sampled tokens a score (and
holds a given soprano fixed), a small additive synthesizer for WAV, and a piano-roll picture.

Harmonizing a melody is constrained decoding: the same model that writes chorales from
nothing writes the alto, tenor and bass while `ScoreGrammar` forces every soprano token (and
the bar lines) to be the melody's. No second model is trained for infilling: the alto, tenor and
bass of a step come after its soprano in the token order, so at each of them the model has
seen the melody up to this step (but not beyond it; a bidirectional infilling model would see
the rest of the melody too, at the price of a second training objective).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence

import numpy as np
import torch

from trustgen.data.music import HOLD, REST, VOICES, Chorale
from trustgen.data.tokenizers import MusicTokenizer

SAMPLE_RATE = 44_100
# Rendered audio peaks 7 dB below full scale, so a listener's +6 dB gain does not clip it (at 0.8,
# a +6 dB gain clipped most chords and halved the audio watermark's detection score).
PEAK = 0.45
_T = MusicTokenizer


class ScoreGrammar:
    """A logits processor that keeps music tokens a score: four voice tokens (pitch, hold or
    rest) per time step, bar lines and the end only between steps, no end straight after a bar
    line or at the start of a piece. With a `plan` (one entry per generated token: an id to
    force, or None for a free voice token), the generated tokens follow it and the piece ends
    where it ends.

    With `ranges` (a (low, high) MIDI pitch pair per voice, e.g. VOICE_RANGES), a sampled voice
    token is never a pitch outside its voice's range; forced tokens are left as the plan says.

    With `min_steps`, a free piece cannot end before that many time steps (16 per 4/4 bar): a
    piece asked for 32 bars is 32 bars, not where the model would have stopped.

    `prompt_length` is the prompt's length in tokens (every row's prompt is the same)."""

    def __init__(self, plan: Sequence[int | None] | None = None, prompt_length: int = 1,
                 ranges: Sequence[tuple[int, int]] | None = None, min_steps: int = 0) -> None:
        self.plan = list(plan) if plan is not None else None
        self.prompt_length = prompt_length
        self.min_steps = min_steps
        pitches = torch.arange(_T.PITCHES)
        # (4, PITCHES): True where voice v may not take that pitch.
        self.outside = None if ranges is None else torch.stack(
            [(pitches < low) | (pitches > high) for low, high in ranges])

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        voices = (history < _T.BAR).sum(dim=1)  # pitches, holds and rests (padding is >= the vocabulary)
        next_voice = voices % 4
        inside_step = next_voice != 0
        scores[inside_step, _T.BAR] = -torch.inf
        scores[inside_step, _T.END] = -torch.inf
        scores[history[:, -1] >= _T.BAR, _T.END] = -torch.inf  # no empty piece, no end after a bar line
        scores[voices < 4 * self.min_steps, _T.END] = -torch.inf
        if self.outside is not None:
            scores[:, : _T.PITCHES] = scores[:, : _T.PITCHES].masked_fill(self.outside[next_voice], -torch.inf)
        if self.plan is not None:
            i = history.shape[1] - self.prompt_length
            forced = self.plan[i] if i < len(self.plan) else _T.END
            if forced is not None:
                scores[:] = -torch.inf
                scores[:, forced] = 0.0
            else:
                scores[:, _T.BAR:] = -torch.inf
        return scores


def voice_token(value: int) -> int:
    """The music token of one grid cell (a pitch, HOLD or REST)."""
    return value if value >= 0 else (_T.HOLD if value == HOLD else _T.REST)


def harmonization_plan(melody: Chorale) -> list[int | None]:
    """The tokens to generate for a soprano line (the first voice of `melody`): its bar lines and
    its soprano tokens forced, the other three voices of each step free."""
    bars = set(melody.bars)
    plan: list[int | None] = []
    for step, value in enumerate(melody.grid[:, 0].tolist()):
        if step in bars:
            plan.append(_T.BAR)
        plan.extend([voice_token(value), None, None, None])
    return plan


# -- audio ------------------------------------------------------------------------------------

def synthesize(chorale: Chorale, tempo: float = 80.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The chorale as mono float32 audio peaking at PEAK: each note a few decaying harmonics (an
    organ-like additive tone) under a short attack and release, so repeated notes are heard."""
    step_seconds = 60.0 / tempo / 4
    total = int((len(chorale) * step_seconds + 0.5) * sample_rate)
    audio = np.zeros(total, dtype=np.float64)
    harmonics = np.array([1.0, 0.5, 0.3, 0.15, 0.08])
    for notes in chorale.voice_notes():
        for onset, duration, pitch in notes:
            start = int(onset * step_seconds * sample_rate)
            length = int(duration * step_seconds * sample_rate)
            t = np.arange(length) / sample_rate
            frequency = 440.0 * 2 ** ((pitch - 69) / 12)
            kept = harmonics[frequency * np.arange(1, len(harmonics) + 1) < sample_rate / 2]
            tone = sum(a * np.sin(2 * np.pi * frequency * (k + 1) * t) for k, a in enumerate(kept))
            envelope = np.minimum(1.0, np.minimum(t / 0.02, (length / sample_rate - t) / 0.05))
            audio[start: start + length] += tone * envelope.clip(min=0) * np.exp(-0.6 * t)
    peak = np.abs(audio).max()
    return (audio / peak * PEAK if peak > 0 else audio).astype(np.float32)


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono float audio as a 16-bit PCM WAV file."""
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file's audio (mono float32, channels averaged) and sample rate."""
    with wave.open(io.BytesIO(data), "rb") as source:
        if source.getsampwidth() != 2:
            raise ValueError("only 16-bit PCM WAV is read")
        frames = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
        audio = frames.reshape(-1, source.getnchannels()).mean(axis=1) / 32768.0
        return audio.astype(np.float32), source.getframerate()


# -- picture ----------------------------------------------------------------------------------

VOICE_COLOURS = ((220, 50, 47), (38, 139, 210), (133, 153, 0), (108, 113, 196))


def piano_roll(chorale: Chorale, cell: int = 4) -> np.ndarray:
    """A piano roll (H, W, 3) uint8: time left to right, pitch bottom to top, one colour per
    voice (soprano red, alto blue, tenor green, bass violet), a gap before every note's onset
    and grey bar lines."""
    sounding = chorale.grid[chorale.grid >= 0]
    low, high = (int(sounding.min()) - 2, int(sounding.max()) + 2) if sounding.size else (48, 72)
    rows = high - low + 1
    picture = np.full((rows * cell, len(chorale) * cell, 3), 255, dtype=np.uint8)
    for bar in chorale.bars:
        picture[:, bar * cell] = 200
    for v, notes in enumerate(chorale.voice_notes()):
        for onset, duration, pitch in notes:
            top = (high - pitch) * cell
            picture[top + 1: top + cell, onset * cell + 1: (onset + duration) * cell] = VOICE_COLOURS[v]
    return picture


__all__ = ["REST", "SAMPLE_RATE", "VOICES", "ScoreGrammar", "harmonization_plan", "piano_roll", "read_wav",
           "synthesize", "voice_token", "wav_bytes"]
