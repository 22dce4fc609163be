"""Music: Bach's chorales on the 16th-note grid, the music tokenizer, generation and harmonization,
the rendered files, the statistics and the watermark read back from MIDI."""

import json
import logging
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli import assert_clear_error, trustgen
from trustgen import api
from trustgen.config import TrainConfig
from trustgen.data import music
from trustgen.data.music import (
    HOLD,
    REST,
    chorale_from_notes,
    chorale_text,
    parse_text,
    parse_tokens,
)
from trustgen.data.prepare import prepare_data
from trustgen.data.tokenizers import MusicTokenizer, tokenizer_from_json
from trustgen.errors import TrustgenError
from trustgen.evaluate.music import ngram_nll, piece_stats, set_stats
from trustgen.safety.trust import (
    AUDIO_WATERMARK,
    Keys,
    Keystore,
    TextTrust,
    artifact_text,
    detect_text,
)
from trustgen.safety.trust import verify as trust_verify
from trustgen.sample.music import SAMPLE_RATE, ScoreGrammar, harmonization_plan, synthesize

T = MusicTokenizer


def corpus_chorales(count: int, held_out: bool) -> list[Path]:
    """Files of music21's Bach chorales: the first `count` in (or out of) the fixed held-out set."""
    from music21 import corpus

    chosen = []
    for name in corpus.chorales.Iterator(returnType="filename"):
        if music.is_held_out(name.split("/")[-1]) == held_out:
            path = corpus.getWork(name)
            chosen.append(Path(path[0] if isinstance(path, list) else path))
        if len(chosen) == count:
            return chosen
    raise AssertionError("too few chorales in music21's corpus")


@pytest.fixture(scope="module")
def held_out() -> list[music.Chorale]:
    return [music.read_score(p) for p in corpus_chorales(3, held_out=True)]


def test_round_trip_is_exact_on_held_out_chorales(held_out: list[music.Chorale]) -> None:
    tokenizer = tokenizer_from_json(MusicTokenizer().to_json())
    assert tokenizer.vocab_size == 132
    for chorale in held_out:
        text = chorale_text(chorale)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        back = parse_tokens(ids, chorale.name)
        assert back.voice_notes() == chorale.voice_notes()
        assert back.bars == chorale.bars and np.array_equal(back.grid, chorale.grid)
        assert len(ids) == 4 * len(chorale) + len(chorale.bars)


def test_tokens_read_forgivingly_and_reject_non_music() -> None:
    # a bar line inside a step is dropped, a hold after silence becomes a rest, the end stops
    ids = [T.BAR, 60, 55, T.BAR, 48, T.HOLD, T.HOLD, T.REST, T.HOLD, 40, T.END, 62]
    chorale = parse_tokens(ids)
    assert chorale.bars == (0,)
    assert chorale.grid.tolist() == [[60, 55, 48, REST], [HOLD, REST, HOLD, 40]]
    with pytest.raises(Exception, match="not a score"):
        MusicTokenizer().encode("hello")


def test_folder_skips_and_names_unreadable_files(scores: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trustgen"):
        found = music.find_chorales(str(scores))
    assert len(found) == 4 and "broken.mid" in caplog.text


def test_a_folder_without_scores_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.mid").write_bytes(b"junk")
    with pytest.raises(TrustgenError, match="no readable four-voice"):
        music.find_chorales(str(tmp_path))
    with pytest.raises(TrustgenError, match="neither a MIDI pitch nor a note name"):
        music.read_melody("60:4 H9")
    with pytest.raises(TrustgenError, match="the melody lasts more than 100000 16ths"):  # not 80 GB of grid
        music.read_melody("60:9999999999")
    long_note = music21_long_note(tmp_path / "long.mid")
    with pytest.raises(TrustgenError, match=r"long.mid lasts 480,00\d 16ths; trustgen reads pieces of at most 100,000"):
        music.read_melody(str(long_note))


def music21_long_note(path: Path) -> Path:
    """A MIDI file whose one note lasts 30,000 whole notes (120,000 16ths)."""
    from music21 import note, stream

    part = stream.Part([note.Note("C5", quarterLength=120_000)])
    stream.Score([part]).write("midi", fp=str(path))
    return path


def test_transpositions_stay_in_range_and_only_train(scores: Path) -> None:
    prepared = prepare_data(TrainConfig(data=str(scores), max_steps=1, val_fraction=0.25))
    assert prepared.tokenizer.kind == "music"
    assert len(prepared.split.val) == 1 and len(prepared.split.train) > 3  # the originals and their keys
    originals = music.find_chorales(str(scores))
    low, high = music.voice_ranges(originals)
    for doc in prepared.split.train:
        c_low, c_high = parse_text(doc.text).pitch_range()
        assert np.all(c_low >= low) and np.all(c_high <= high)
    assert all(d.name in {c.name for c in originals} for d in prepared.split.val)


def test_grammar_forces_the_plan_and_keeps_steps_whole() -> None:
    melody = chorale_from_notes("m", [[(0, 2, 67), (2, 2, 69)], [], [], []], bars=[0])
    plan = harmonization_plan(melody)
    assert plan == [T.BAR, 67, None, None, None, T.HOLD, None, None, None, 69, None, None, None, T.HOLD,
                    None, None, None]
    grammar = ScoreGrammar(plan)
    history = torch.tensor([[T.END, T.BAR, 67]])
    scores = grammar(history, torch.zeros(1, 132))
    assert torch.isinf(scores[0, T.BAR:]).all() and torch.isfinite(scores[0, :T.BAR]).all()
    forced = grammar(torch.tensor([[T.END, T.BAR, 67, 60, 55, 48]]), torch.zeros(1, 132))
    assert forced[0].argmax() == T.HOLD and torch.isinf(forced[0]).sum() == 131
    inside = ScoreGrammar()(torch.tensor([[T.END, 60, 55]]), torch.zeros(1, 132))
    assert torch.isinf(inside[0, [T.BAR, T.END]]).all()
    after_bar = ScoreGrammar()(torch.tensor([[T.END, 60, 55, 48, 40, T.BAR]]), torch.zeros(1, 132))
    assert torch.isinf(after_bar[0, T.END]) and torch.isfinite(after_bar[0, T.BAR])
    at_start = ScoreGrammar()(torch.tensor([[T.END]]), torch.zeros(1, 132))
    assert torch.isinf(at_start[0, T.END]) and torch.isfinite(at_start[0, :T.END]).all()


def test_a_piece_asked_for_at_least_two_steps_cannot_end_after_one() -> None:
    one_step, two_steps = torch.tensor([[T.END, 60, 55, 48, 40]]), torch.tensor([[T.END, 60, 55, 48, 40] + [T.HOLD] * 4])
    assert torch.isfinite(ScoreGrammar()(one_step, torch.zeros(1, 132))[0, T.END])
    assert torch.isinf(ScoreGrammar(min_steps=2)(one_step, torch.zeros(1, 132))[0, T.END])
    assert torch.isfinite(ScoreGrammar(min_steps=2)(two_steps, torch.zeros(1, 132))[0, T.END])


def test_statistics_count_parallels_crossings_and_chords() -> None:
    # C major (C5 G4 E4 C3) to D minor moving in parallel octaves and fifths between soprano and bass
    chorale = chorale_from_notes("p", [[(0, 4, 72), (4, 4, 74)], [(0, 4, 67), (4, 4, 69)],
                                       [(0, 4, 64), (4, 4, 65)], [(0, 4, 48), (4, 4, 50)]])
    stats = piece_stats(chorale)
    assert stats["chords"] == 2 and stats["standard_chords"] == 2
    assert stats["parallels"] == 2  # soprano-bass octaves and alto-bass fifths (parallel fourths are allowed)
    crossed = chorale_from_notes("x", [[(0, 4, 60)], [(0, 4, 64)], [(0, 4, 55)], [(0, 4, 30)]])
    summary = set_stats([crossed])
    assert summary["voice_crossings_per_100_chords"] == 100 and summary["voice_range_violations"] == 0.25
    training, test = [[T.END, 60, 62, 60, 62, T.END]] * 100, [[T.END, 60, 62, 60]]
    assert ngram_nll(training, test, 2, 132) < ngram_nll(training, test, 1, 132)


def test_grammar_keeps_sampled_voices_in_their_ranges() -> None:
    grammar = ScoreGrammar(ranges=music.VOICE_RANGES)
    for sounded, (low, high) in enumerate(music.VOICE_RANGES):  # the next token is voice `sounded`
        history = torch.tensor([[T.END, T.BAR, *[60, 55, 48][:sounded]]])
        allowed = torch.isfinite(grammar(history, torch.zeros(1, 132))[0])
        assert allowed[:T.PITCHES].nonzero().flatten().tolist() == list(range(low, high + 1))
        assert allowed[T.HOLD] and allowed[T.REST]
    harmonize = ScoreGrammar([30, None, None, None], ranges=music.VOICE_RANGES)  # a forced note stays
    assert harmonize(torch.tensor([[T.END]]), torch.zeros(1, 132))[0].argmax() == 30


@pytest.mark.slow
def test_generate_writes_playable_files_and_the_mark_is_read_from_midi(music_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pieces"
    # A harmonization, so the piece is three bars long whatever the (per-session) key: a free piece
    # from a three-step model may sample its end after one chord, too short to carry the mark.
    melody = "67:4 69:4 71:4 72:4 74:4 72:4 71:4 69:4 67:4 66:4 67:8"
    result = trustgen("generate", str(music_run), "--prompt", melody, "--seed", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    piece = out / "piece-1"
    assert music.read_score(piece.with_suffix(".mid")).grid.shape[1] == 4
    assert music.read_score(piece.with_suffix(".musicxml")).grid.shape[1] == 4
    with wave.open(str(piece.with_suffix(".wav"))) as audio:
        assert audio.getframerate() == 44_100 and audio.getnframes() > 44_100 // 2
    assert Image.open(piece.with_suffix(".png")).size[0] > 0
    detected = trustgen("detect", str(piece.with_suffix(".mid")), "--json")
    assert detected.returncode == 0, detected.stdout + detected.stderr
    assert json.loads(detected.stdout)["verdict"] == "watermarked"
    verified = trustgen("verify", str(piece.with_suffix(".mid")))
    assert verified.returncode == 0 and "verified" in verified.stdout
    wav = piece.with_suffix(".wav")
    assert not wav.with_name(wav.name + ".manifest.json").exists()  # C2PA inside the WAV, no sidecar
    verified = trustgen("verify", str(wav), "--json")  # three training steps: noise, too busy to carry the mark
    assert verified.returncode == 0 and json.loads(verified.stdout)["status"] == "verified", verified.stdout
    bach = tmp_path / "bach.mid"
    music.write_score(music.read_score(corpus_chorales(1, held_out=True)[0]), bach)
    assert detect_text(artifact_text(bach), Keystore()).verdict == "no watermark found"


def test_files_named_like_audio_or_scores_that_are_not_get_one_sentence(tmp_path: Path) -> None:
    # Told apart by their first bytes, a broken .wav used to be tested as text: "too short to tell".
    wav, midi = tmp_path / "take.wav", tmp_path / "take.mid"
    wav.write_bytes(b"not audio")
    midi.write_bytes(b"not a midi file")
    assert_clear_error(trustgen("detect", str(wav)), "take.wav is named like a WAV file but is not one")
    keys = Keys(tmp_path / "keys")
    keys.watermark_key()  # without a key, verify does not test for a watermark at all
    with pytest.raises(TrustgenError, match=r"take\.wav is named like a WAV file"):
        trust_verify(wav, keys)
    with pytest.raises(TrustgenError, match=r"take\.mid could not be read as a score"):
        trust_verify(midi, keys)


@pytest.mark.slow
def test_a_rendered_chorale_carries_the_audio_mark_and_c2pa(held_out: list[music.Chorale], tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    trust = TextTrust(keys, model_id="ab" * 32, family="gpt", vocab_size=T().vocab_size,
                      tokenizer_json=T().to_json(), watermark="kgw")
    wav = trust.save_audio(synthesize(held_out[0]), tmp_path / "bach.wav", sample_rate=SAMPLE_RATE).path
    detected = trustgen("detect", str(wav), "--keystore", str(keys.path))
    assert detected.returncode == 0 and detected.stdout.startswith("watermarked"), detected.stdout
    report = trust_verify(wav, keys)
    assert report["status"] == "verified" and report["watermark"]["verdict"] == "watermarked"
    assert report["claim"]["watermark"]["scheme"] == AUDIO_WATERMARK and "tokenizer_sha256" not in report["claim"]
    data = bytearray(wav.read_bytes())
    data[data.find(b"data") + 8 + 44_100] ^= 0x01  # one sample's lowest bit
    wav.write_bytes(bytes(data))
    tampered = trustgen("verify", str(wav), "--keystore", str(keys.path))
    assert tampered.returncode != 0 and "modified" in tampered.stdout and "watermark present" in tampered.stdout


@pytest.mark.slow
def test_harmonization_keeps_the_soprano_exactly(music_run: Path, held_out: list[music.Chorale]) -> None:
    bach = held_out[0]
    bars = [b for b in bach.bars if b < 24]
    melody = chorale_from_notes("m", [[n for n in bach.voice_notes()[0] if n[0] + n[1] <= 24], [], [], []], bars)
    model = api.load(music_run)
    for piece in api.compose(model, 2, melody=melody, seed=0):
        assert piece.chorale.voice_notes()[0] == melody.voice_notes()[0]
        assert piece.chorale.bars == melody.bars and len(piece.chorale) == len(melody)


@pytest.mark.slow
def test_free_pieces_last_at_least_min_bars(music_run: Path) -> None:
    model = api.load(music_run)
    pieces = api.compose(model, 3, bars=2, min_bars=2, seed=0, max_new_tokens=400)
    assert all(len(piece.chorale) >= 32 for piece in pieces)  # 16 steps of a 16th a bar
    with pytest.raises(TrustgenError, match="min_bars must be between 0 and bars"):
        api.compose(model, 1, bars=2, min_bars=3)


@pytest.mark.slow
def test_evaluate_reports_nll_and_bach_floor(music_run: Path) -> None:
    result = trustgen("evaluate", str(music_run), "-n", "2", "--bars", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["generated"]["heldout_nll"] > 0 and report["baselines"]["bigram_heldout_nll"] > 0
    assert 0 <= report["bach"]["mean_overlapping_area"] <= 1
    assert (music_run / "music_evaluation.json").exists()
