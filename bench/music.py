"""Music on Bach's chorales: held-out NLL, musical statistics of new pieces and of
harmonizations, and the symbolic watermark's power.

Trains a GPT and, as the baseline trained for the same time, an LSTM (`rnn`) on `--data bach`
(or reuses bench/out/music/run-FAMILY), then measures:

- held-out NLL per token of both, beside add-one unigram and bigram models of the training tokens;
- `--pieces` new pieces of up to `--bars` bars from the GPT: pitch-class histogram distance,
  voice-range violations, crossings, parallel fifths/octaves per 100 chords, standard chords,
  mean overlapping area, beside Bach (training chorales scored against the held-out ones);
- harmonizations of the first 8 bars of `--lines` held-out soprano lines, side by side with
  Bach's own harmonizations of the same 8 bars;
- the kgw watermark: `--marked` watermarked pieces of exactly 32 bars (detected from their notes, as a
  MIDI file gives them back) against Bach's held-out chorales in all 12 keys; the threshold that
  keeps Bach's false positives at 1% and the TPR at it.

    python bench/music.py --budget 10m     # the issue's setting: 10 minutes per model
    python bench/music.py --quick          # a few CPU-minutes
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

import numpy as np
from common import Results, environment, set_threads

from trustgen import api
from trustgen.config import parse_duration
from trustgen.data.music import (
    Chorale,
    bach_chorales,
    chorale_from_notes,
    chorale_text,
    split_chorales,
    transpositions,
)
from trustgen.data.tokenizers import MusicTokenizer
from trustgen.evaluate.music import compare, ngram_nll, set_stats
from trustgen.evaluate.text import sequence_nll
from trustgen.safety.watermark.text import make_watermark

OUT = Path(__file__).parent / "out" / "music"
MODELS = {"gpt": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256},
          "rnn": {"n_layer": 2, "hidden_size": 256, "block_size": 256}}
TOKENIZER = MusicTokenizer()


def tokens(pieces: list[Chorale]) -> list[list[int]]:
    return [[TOKENIZER.END, *TOKENIZER.encode(chorale_text(c)), TOKENIZER.END] for c in pieces]


def trained(family: str, budget: float, quick: bool) -> api.TextModel:
    run = OUT / f"run-{family}{'-quick' if quick else ''}"
    if not (run / "config.json").exists():
        started = time.perf_counter()
        api.train(run, model=family, model_config=MODELS[family], data="bach", time_budget=budget,
                  eval_interval=100, progress=False)
        print(f"trained {family} in {time.perf_counter() - started:.0f}s")
    return api.load(run)


def opening(chorale: Chorale, bars: int = 8) -> Chorale:
    """The chorale's first `bars` bars (counted from its first full bar)."""
    full = [b for b in chorale.bars if b > 0] or [0]
    end = min(full[0] + 16 * bars, len(chorale))
    voices = [[n for n in voice if n[0] + n[1] <= end] for voice in chorale.voice_notes()]
    return chorale_from_notes(chorale.name, voices, [b for b in chorale.bars if b < end], end)


def stats_row(label: str, stats: dict, against: dict) -> list:
    compared = compare(stats, against)
    return [label, stats["pieces"], stats["chords"], f"{compared['pitch_class_histogram_distance']:.3f}",
            f"{stats['voice_range_violations']:.2%}", f"{stats['voice_crossings_per_100_chords']:.2f}",
            f"{stats['parallel_fifths_octaves_per_100_chords']:.2f}", f"{stats['standard_chord_share']:.1%}",
            f"{compared['mean_overlapping_area']:.3f}"]


STATS_HEADERS = ["set", "pieces", "chords", "PC hist. dist.", "range viol.", "crossings/100", "par. 5/8 /100",
                 "triads+7ths", "mean OA"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="10m", help="training time per model")
    parser.add_argument("--pieces", type=int, default=16)
    parser.add_argument("--bars", type=int, default=16)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--marked", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    set_threads(args.threads)
    budget = 20.0 if args.quick else parse_duration(args.budget)
    pieces_n, bars, lines, marked = (4, 4, 4, 4) if args.quick else (args.pieces, args.bars, args.lines, args.marked)
    record.note(environment())

    chorales = bach_chorales()
    train, held_out = split_chorales("bach", chorales, 0.1, 0)
    record.note(f"{len(chorales)} chorales: {len(train)} for training (+{len(transpositions(train))} transposed), "
                f"{len(held_out)} held out; models trained {budget:.0f}s each")
    models = {family: trained(family, budget, args.quick) for family in MODELS}

    held_tokens, train_tokens = tokens(held_out), tokens([*train, *transpositions(train)])
    rows = []
    for family, model in models.items():
        nll, scored = sequence_nll(model.model, held_tokens)
        rows.append([family, f"{model.n_parameters:,}", f"{nll.sum() / scored.sum():.3f}"])
    for order, name in ((1, "unigram (add-one)"), (2, "bigram (add-one)")):
        rows.append([name, "-", f"{ngram_nll(train_tokens, held_tokens, order, TOKENIZER.vocab_size):.3f}"])
    record.table("held-out NLL", ["model", "parameters", "held-out NLL (nats/token)"], rows)

    gpt = models["gpt"]
    reference = set_stats(held_out)
    started = time.perf_counter()
    free = [p.chorale for p in api.compose(gpt, pieces_n, bars=bars, seed=0)]
    record.note(f"{pieces_n} pieces of up to {bars} bars in {time.perf_counter() - started:.0f}s")
    record.table("new pieces vs held-out chorales", STATS_HEADERS, [
        stats_row("gpt, new pieces", set_stats(free), reference),
        stats_row("Bach (training chorales)", set_stats(train), reference),
        stats_row("Bach (held-out, itself)", reference, reference)])

    excerpts = [opening(c) for c in held_out[:lines]]
    harmonized = []
    for excerpt in excerpts:
        melody = chorale_from_notes(excerpt.name, [excerpt.voice_notes()[0], [], [], []], excerpt.bars, len(excerpt))
        piece = api.compose(gpt, 1, melody=melody, seed=0)[0].chorale
        assert piece.voice_notes()[0] == excerpt.voice_notes()[0], "the soprano was not kept"
        harmonized.append(piece)
    bach_excerpts = set_stats(excerpts)
    record.table(f"harmonizations of {len(excerpts)} held-out soprano lines (8 bars)", STATS_HEADERS, [
        stats_row("gpt harmonizations", set_stats(harmonized), bach_excerpts),
        stats_row("Bach's harmonizations", bach_excerpts, bach_excerpts)])

    keystore = OUT / "keys"
    marked_pieces = api.compose(gpt, marked, bars=32, min_bars=32, seed=1, watermark="kgw", keystore=keystore)
    key = api.Keys(keystore).watermark_key().secret
    scheme = make_watermark("kgw", key, TOKENIZER.vocab_size)
    positives = [scheme.detect(TOKENIZER.encode(chorale_text(p.chorale))).z_score for p in marked_pieces]
    negatives = [scheme.detect(TOKENIZER.encode(chorale_text(c))).z_score
                 for c in [*held_out, *transpositions(held_out)]]
    other_key = make_watermark("kgw", secrets.token_bytes(32), TOKENIZER.vocab_size)
    wrong_key = [other_key.detect(TOKENIZER.encode(chorale_text(p.chorale))).z_score for p in marked_pieces]
    threshold = float(np.quantile(negatives, 0.99))
    lengths = [len(p.chorale) / 16 for p in marked_pieces]
    record.table("kgw watermark in notes (32-bar pieces vs Bach's held-out chorales in 12 keys)",
                 ["pieces", "mean bars", "Bach chorales", "z at 1% FPR", "TPR", "FPR (other key)", "median z"], [
                     [marked, f"{np.mean(lengths):.1f}", len(negatives), f"{threshold:.2f}",
                      f"{np.mean(np.array(positives) > threshold):.2f}",
                      f"{np.mean(np.array(wrong_key) > threshold):.2f}", f"{np.median(positives):.1f}"]])
    print(f"wrote {record.write()}")


if __name__ == "__main__":
    main()
