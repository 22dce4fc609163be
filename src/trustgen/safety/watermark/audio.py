"""A keyed watermark for audio, with a blind detector and a rigorous p-value.

Why this scheme. The mark must survive resampling to 22.05 kHz, an mp3-like low-pass at 8 kHz,
white noise at 20 dB SNR, a gain of ±6 dB and cropping to 10 s, while the marked audio stays
within 35 dB SNR of the original. What all five leave alone is the coarse loudness of the
audio in bands between 500 Hz and 5 kHz over a few tens of milliseconds: the low-pass and the
resampling keep the band, a gain moves every band's log-power by the same constant, the noise
is weak against the partials that carry the music, and a crop keeps the pattern if it repeats.

Embedding (patchwork on the STFT, multiplicative, so it is shaped by the host). The band is cut
into BANDS stripes of equal width and time into TILE-second tiles; the key draws a ±1 sign per
(stripe, tile) for PERIOD tiles, and the pattern repeats every PERIOD tiles (1.06 s). Every STFT
coefficient in a stripe and tile is scaled by 1 + α·sign: the mark is the host's own sound made
a little louder or softer, so it sits under the partials and nowhere else. α is set so the
marked audio is TARGET_SNR dB from the original. The period is deliberately not a multiple of
the music's beat or bar (80 bpm: 0.75 s beats, 3 s bars), so a piece's rhythm does not fold
onto itself the way the mark does.

Detection. The audio is resampled to 16 kHz; band powers are summed per stripe and tile, and
each tile's log-power is compared with the mean of its two neighbours in time (a gain and the
slow decay of notes cancel; the alternating mark does not). Quiet tiles (less than 10 dB above
the stripe's 10th percentile) are left out, residuals are clipped at three robust standard
deviations (note onsets), and what remains is summed per (stripe, pattern phase): R. The
statistic is z = <R, w> / |R| for the key's signs w, over every alignment a crop can have
(PERIOD phase shifts times the analysis frames in a tile). For audio that was not marked with
this key, w is a vector of independent fair signs whatever R is, so by Hoeffding's inequality
P(z >= t) <= exp(-t^2 / 2) for each alignment: the p-value is that bound times the alignments
tried (Bonferroni) and times the keys tried. It is conservative (the benchmark measures how
rarely unmarked audio comes near it) and needs no calibration that could drift.

Measured in bench/audio_watermark.py (see docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SCHEME = "stft-patchwork"
TARGET_SNR = 36.0  # dB of the original against the mark (the issue asks for at least 35)
BAND = (500.0, 5000.0)  # Hz: above most fundamentals' energy, below an 8 kHz low-pass
BANDS = 32  # stripes of ~140 Hz: most hold one partial of a four-voice chord
TILE = 0.02  # seconds; shorter tiles outpace the beating of near-unison partials (0.1 s: z 3, 0.02 s: z 11)
PERIOD = 53  # tiles per repetition (1.06 s), not a multiple of the musical grid
ANALYSIS_RATE = 16_000
ANALYSIS_FFT, ANALYSIS_HOP = 256, 80  # 16 ms windows every 5 ms: four frames per tile
EMBED_WINDOW = 0.0116  # seconds of the embedding STFT's window (512 samples at 44.1 kHz)
ACTIVE_DB = 10.0  # a tile counts when this far above its stripe's 10th percentile
CLIP = 3.0  # residuals clipped at this many robust standard deviations
MIN_SECONDS = 2.0  # shorter audio gets no verdict
ALPHA = 1e-3  # called watermarked below this corrected p-value


@dataclass(frozen=True)
class AudioDetection:
    verdict: str  # "watermarked", "no watermark found" or "too short to tell"
    key_id: str
    z_score: float
    p_value: float  # Hoeffding bound times alignments and keys tried
    keys_tried: int
    alignments: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "scheme": SCHEME, "key_id": self.key_id, "z_score": self.z_score,
                "p_value": self.p_value, "keys_tried": self.keys_tried, "alignments": self.alignments,
                "seconds": self.seconds}


@lru_cache(maxsize=16)
def _pattern(secret: bytes) -> np.ndarray:
    """The key's signs, (BANDS, PERIOD), read-only."""
    seed = hmac.new(secret, b"trustgen audio watermark v1", hashlib.sha256).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    signs = rng.choice(np.array([-1.0, 1.0]), size=(BANDS, PERIOD))
    signs.flags.writeable = False
    return signs


def _stripe(frequencies: np.ndarray) -> np.ndarray:
    """Each frequency's stripe, -1 outside the band."""
    low, high = BAND
    stripe = np.floor((frequencies - low) / (high - low) * BANDS).astype(int)
    stripe[(frequencies < low) | (frequencies >= high)] = -1
    return stripe


def embed(audio: np.ndarray, sample_rate: int, secret: bytes, snr: float = TARGET_SNR) -> np.ndarray:
    """The mono float audio with the key's mark, `snr` dB from the original (float32)."""
    from scipy import signal  # imported here: it costs every CLI command half a second at start

    host = np.asarray(audio, dtype=np.float64)
    window = 2 ** round(math.log2(EMBED_WINDOW * sample_rate))
    hop = window // 4
    frequencies, times, spectrum = signal.stft(host, sample_rate, nperseg=window, noverlap=window - hop)
    stripe = _stripe(frequencies)
    inside = stripe >= 0
    phase = np.floor(times / TILE).astype(int) % PERIOD
    signs = np.zeros(spectrum.shape)
    signs[inside] = _pattern(secret)[stripe[inside]][:, phase]
    _, mark = signal.istft(spectrum * signs, sample_rate, nperseg=window, noverlap=window - hop)
    mark = mark[: len(host)]
    energy = float(np.sum(mark ** 2))
    if energy == 0.0:  # silence, or nothing in the band: nothing to hide a mark in
        return host.astype(np.float32)
    scale = math.sqrt(float(np.sum(host ** 2)) / energy / 10 ** (snr / 10))
    return (host + scale * mark).astype(np.float32)


def snr_db(original: np.ndarray, marked: np.ndarray) -> float:
    """The mark's SNR: the original's energy over the change's, in dB."""
    change = np.asarray(marked, dtype=np.float64) - original
    return 10 * math.log10(float(np.sum(np.square(original, dtype=np.float64))) / float(np.sum(change ** 2)))


def _folded_residuals(audio: np.ndarray, sample_rate: int) -> list[np.ndarray]:
    """R for each sub-tile alignment: (BANDS, PERIOD) sums of clipped log-power residuals."""
    from scipy import signal

    divisor = math.gcd(int(sample_rate), ANALYSIS_RATE)
    audio = signal.resample_poly(np.asarray(audio, dtype=np.float64), ANALYSIS_RATE // divisor,
                                 int(sample_rate) // divisor)
    frequencies, _, spectrum = signal.stft(audio, ANALYSIS_RATE, nperseg=ANALYSIS_FFT,
                                           noverlap=ANALYSIS_FFT - ANALYSIS_HOP, boundary=None, padded=False)
    power = np.abs(spectrum) ** 2
    stripe = _stripe(frequencies)
    bands = np.stack([power[stripe == b].sum(axis=0) for b in range(BANDS)])  # (BANDS, frames)
    frames = round(TILE * ANALYSIS_RATE / ANALYSIS_HOP)
    tiny = 1e-10 * float(bands.mean()) + 1e-30  # relative, so a gain changes nothing
    folded = []
    for offset in range(frames):
        tiles = (bands.shape[1] - offset) // frames
        level = np.log(bands[:, offset: offset + tiles * frames].reshape(BANDS, tiles, frames).sum(axis=2) + tiny)
        residual = level[:, 1:-1] - (level[:, :-2] + level[:, 2:]) / 2
        floor = np.percentile(level, 10, axis=1, keepdims=True)
        active = level[:, 1:-1] > floor + ACTIVE_DB * math.log(10) / 10
        spread = 1.4826 * float(np.median(np.abs(residual[active]))) if active.any() else 0.0
        residual = np.clip(residual, -CLIP * spread, CLIP * spread) * active
        R = np.zeros((BANDS, PERIOD))
        np.add.at(R.T, np.arange(1, tiles - 1) % PERIOD, residual.T)
        folded.append(R)
    return folded


def detect(audio: np.ndarray, sample_rate: int, keys: dict[str, bytes]) -> AudioDetection:
    """Test mono float audio for the mark of each key; the best key is reported."""
    seconds = len(audio) / sample_rate
    folded = _folded_residuals(audio, sample_rate) if seconds >= MIN_SECONDS else []
    alignments = len(folded) * PERIOD
    best = (-math.inf, next(iter(keys)))
    for key_id, secret in keys.items():
        signs = _pattern(secret)
        for R in folded:
            norm = float(np.sqrt(np.sum(R ** 2)))
            if norm == 0.0:
                continue
            # <R, roll(w, c)> for every phase shift c at once, by circular cross-correlation.
            scores = np.fft.irfft(np.conj(np.fft.rfft(R, axis=1)) * np.fft.rfft(signs, axis=1), n=PERIOD,
                                  axis=1).sum(axis=0)
            best = max(best, (float(scores.max()) / norm, key_id))
    z, key_id = best
    if not folded:
        return AudioDetection("too short to tell", key_id, 0.0, 1.0, len(keys), 0, seconds)
    p = min(1.0, math.exp(-max(z, 0.0) ** 2 / 2) * alignments * len(keys))
    verdict = "watermarked" if p < ALPHA else "no watermark found"
    return AudioDetection(verdict, key_id, z if math.isfinite(z) else 0.0, p, len(keys), alignments, seconds)
