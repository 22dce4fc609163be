"""The audio watermark (trustgen.safety.watermark.audio) on rendered Bach chorales: its SNR, and
how often it is found after each edit the issue lists, against unmarked audio.

Marked: the held-out chorales rendered as `trustgen generate` renders a piece, each marked under
`--keys` different keys. Unmarked: `--unmarked` training chorales rendered the same way, the
held-out chorales themselves, and a few other signals (white noise, sine sweeps, a random-note
piece), tested under the first key. Every file goes through each edit, then a 16-bit WAV. For
each edit: the threshold on the detector's z that keeps the unmarked false positives at 1%
(calibrated on that edit's unmarked scores), the TPR at it, and the TPR and FPR of the
detector's own verdict (corrected p < 0.001, no calibration).

    python bench/audio_watermark.py            # 26 marked x 2 keys, 120 unmarked: ~10 CPU-minutes
    python bench/audio_watermark.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import secrets

import numpy as np
from common import Results, environment, set_threads
from scipy import signal

from trustgen.data.music import bach_chorales, chorale_from_notes, split_chorales
from trustgen.safety.watermark import audio
from trustgen.sample.music import SAMPLE_RATE, read_wav, synthesize, wav_bytes


def edits(x: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, int]]:
    """Each edit of the issue applied to float audio at 44.1 kHz, as (audio, sample rate)."""
    start = int(rng.integers(0, max(1, len(x) - 10 * SAMPLE_RATE)))
    return {
        "none": (x, SAMPLE_RATE),
        "resampled to 22.05 kHz": (signal.resample_poly(x, 1, 2), SAMPLE_RATE // 2),
        "low-pass 8 kHz (8th-order Butterworth)": (
            signal.sosfilt(signal.butter(8, 8000, fs=SAMPLE_RATE, output="sos"), x), SAMPLE_RATE),
        "white noise, 20 dB SNR": (x + rng.normal(0, np.sqrt(np.mean(x ** 2) / 100), len(x)), SAMPLE_RATE),
        "gain +6 dB": (x * 2, SAMPLE_RATE),
        "gain -6 dB": (x / 2, SAMPLE_RATE),
        "cropped to 10 s (random start)": (x[start: start + 10 * SAMPLE_RATE], SAMPLE_RATE),
    }


def scores(x: np.ndarray, keys: dict[str, bytes], rng: np.random.Generator) -> dict[str, tuple[float, str]]:
    """The detector's z and verdict after each edit (written as a 16-bit WAV and read back)."""
    found = {}
    for name, (edited, rate) in edits(np.asarray(x, dtype=np.float64), rng).items():
        detection = audio.detect(read_wav(wav_bytes(edited, rate))[0], rate, keys)
        found[name] = (detection.z_score, detection.verdict)
    return found


def other_signals(rng: np.random.Generator) -> list[np.ndarray]:
    """Unmarked audio that is not a chorale: noise, sweeps and a piece of random notes."""
    seconds = np.arange(20 * SAMPLE_RATE) / SAMPLE_RATE
    random_notes = [[(i * 2, 2, int(p)) for i, p in enumerate(rng.integers(low, low + 20, 40))]
                    for low in (60, 55, 48, 40)]
    return [rng.normal(0, 0.1, 20 * SAMPLE_RATE), signal.chirp(seconds, 100, 20, 8000) * 0.3,
            signal.chirp(seconds, 200, 20, 2000, method="logarithmic") * 0.3,
            synthesize(chorale_from_notes("random", random_notes, length=80))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--unmarked", type=int, default=90, help="training chorales rendered unmarked")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads(1)
    if args.quick:
        args.keys, args.unmarked = 1, 8
    record = Results(__file__, args.quick)
    train, held_out = split_chorales("bach", bach_chorales(), 0.1, 0)
    if args.quick:
        held_out = held_out[:4]
    rng = np.random.default_rng(0)
    keys = {f"key{i}": secrets.token_bytes(32) for i in range(args.keys)}
    first = dict([next(iter(keys.items()))])
    marked: list[dict[str, tuple[float, str]]] = []
    snrs = []
    for chorale in held_out:
        original = synthesize(chorale)
        for key_id, secret in keys.items():
            watermarked = audio.embed(original, SAMPLE_RATE, secret)
            snrs.append(audio.snr_db(original, watermarked))
            marked.append(scores(watermarked, {key_id: secret}, rng))
    unmarked_audio = [synthesize(c) for c in train[: args.unmarked]] + [synthesize(c) for c in held_out]
    unmarked = [scores(x, first, rng) for x in unmarked_audio + other_signals(rng)]
    rows = []
    for edit in marked[0]:
        null = np.array([s[edit][0] for s in unmarked])
        hits = np.array([s[edit][0] for s in marked])
        threshold = float(np.quantile(null, 0.99))
        rows.append([edit, f"{np.mean(hits > threshold):.3f}", f"{threshold:.2f}",
                     f"{np.mean([s[edit][1] == 'watermarked' for s in marked]):.3f}",
                     f"{np.mean([s[edit][1] == 'watermarked' for s in unmarked]):.3f}",
                     f"{np.min(hits):.2f}", f"{np.median(hits):.2f}", f"{np.max(null):.2f}"])
    record.note(environment())
    record.note(f"{len(marked)} marked renders ({len(held_out)} held-out chorales x {len(keys)} keys), "
                f"{len(unmarked)} unmarked ({args.unmarked} training + {len(held_out)} held-out chorales + 4 other "
                f"signals); mark SNR {min(snrs):.2f}-{max(snrs):.2f} dB (target {audio.TARGET_SNR})")
    record.table("audio watermark by edit", ["edit", "TPR at 1% FPR", "z threshold (1% FPR)", "TPR (verdict)",
                                             "FPR (verdict)", "marked z min", "marked z median", "unmarked z max"],
                 rows)
    record.write()


if __name__ == "__main__":
    main()
