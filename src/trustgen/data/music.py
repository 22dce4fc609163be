"""Four-voice music: Bach's chorales from `music21`'s corpus, folders of MIDI or MusicXML files,
and the 16th-note grid that trustgen's music tokenizer writes as text.

A `Chorale` is a (T, 4) grid of time steps (a 16th note each) by voices (soprano, alto, tenor,
bass): a MIDI pitch where a note starts, HOLD while it sounds on, REST where the voice is silent;
plus the steps where bars start. `chorale_text` turns it into music tokens (see
`MusicTokenizer`) and `parse_text` back; the notes survive the round trip exactly. Reading and
writing score files goes through music21's own parsers and writers; music21 is imported only
when a score file is read or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trustgen.cache import cache_dir
from trustgen.data.tokenizers import MusicTokenizer
from trustgen.errors import TrustgenError

log = logging.getLogger("trustgen")

HOLD, REST = -1, -2
STEPS_PER_QUARTER = 4
VOICES = ("soprano", "alto", "tenor", "bass")
# Textbook SATB ranges (MIDI, inclusive): soprano C4-A5, alto G3-D5, tenor C3-A4, bass E2-D4. The
# evaluation counts notes outside them; free sampling keeps every voice inside them.
VOICE_RANGES = ((60, 81), (55, 74), (48, 69), (40, 62))
MUSIC_SUFFIXES = {".mid", ".midi", ".musicxml", ".mxl", ".xml"}
BACH_CACHE_VERSION = 1  # part of the cache file's name: a change to the parsing makes a new cache
_TOKENS = MusicTokenizer()

Note = tuple[int, int, int]  # (onset step, duration in steps, MIDI pitch)


@dataclass(frozen=True, eq=False)
class Chorale:
    """A four-voice piece on a 16th-note grid: `grid` (T, 4) int16 and the steps that start bars."""

    name: str
    grid: np.ndarray
    bars: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.grid)

    def voice_notes(self) -> list[list[Note]]:
        """Each voice's notes, in order: (onset step, duration in steps, MIDI pitch)."""
        voices = []
        for column in self.grid.T.tolist():
            notes: list[list[int]] = []
            for step, value in enumerate(column):
                if value >= 0:
                    notes.append([step, 1, value])
                elif value == HOLD and notes and notes[-1][0] + notes[-1][1] == step:
                    notes[-1][1] += 1
            voices.append([tuple(n) for n in notes])
        return voices

    def pitch_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest pitch of each voice (a voice with no note: 127 and 0)."""
        sounding = np.where(self.grid >= 0, self.grid, -1)
        high = sounding.max(axis=0).clip(min=0)
        low = np.where(self.grid >= 0, self.grid, 127).min(axis=0)
        return low, high

    def transposed(self, semitones: int) -> Chorale:
        grid = np.where(self.grid >= 0, self.grid + semitones, self.grid).astype(np.int16)
        return Chorale(f"{self.name}{semitones:+d}", grid, self.bars)


def chorale_from_notes(name: str, voices: Sequence[Sequence[Note]], bars: Sequence[int] = (),
                       length: int | None = None) -> Chorale:
    """A grid from each voice's notes; a note that starts before the previous one ends cuts it."""
    if len(voices) != 4:
        raise TrustgenError(f"{name} has {len(voices)} voices, not the four of soprano, alto, tenor and bass.")
    end = max((onset + duration for voice in voices for onset, duration, _ in voice), default=0)
    length = max(end, length or 0)
    if length == 0:
        raise TrustgenError(f"{name} has no notes.")
    grid = np.full((length, 4), REST, dtype=np.int16)
    for v, voice in enumerate(voices):
        for onset, duration, pitch in voice:
            if not 0 <= pitch < 128:
                raise TrustgenError(f"{name}: pitch {pitch} is not a MIDI pitch (0-127).")
            grid[onset + 1: onset + max(duration, 1), v] = HOLD
            grid[onset, v] = pitch
    bars = tuple(sorted({b for b in bars if 0 <= b < length})) or tuple(range(0, length, 4 * STEPS_PER_QUARTER))
    return Chorale(name, grid, bars)


# -- text (music tokens) ----------------------------------------------------------------------

def chorale_text(chorale: Chorale) -> str:
    """The chorale as music tokens (without the blank line that separates pieces)."""
    bars = set(chorale.bars)
    pieces = []
    for step, row in enumerate(chorale.grid.tolist()):
        if step in bars:
            pieces.append("|\n")
        pieces.append("".join(f"{v} " if v >= 0 else ("_ " if v == HOLD else "r ") for v in row))
    return "".join(pieces)


def parse_tokens(ids: Sequence[int], name: str = "generated") -> Chorale:
    """A chorale from music token ids, reading forgivingly what a model wrote: a bar line inside
    a time step is dropped, an unfinished last step too, a hold after silence is a rest, and the
    first piece boundary ends the piece."""
    steps: list[list[int]] = []
    bars: list[int] = []
    current: list[int] = []
    for token in ids:
        if token == _TOKENS.END:
            if steps or current:
                break
            continue
        if token == _TOKENS.BAR:
            if not current:
                bars.append(len(steps))
            continue
        current.append(token if token < _TOKENS.PITCHES else (HOLD if token == _TOKENS.HOLD else REST))
        if len(current) == 4:
            steps.append(current)
            current = []
    if not steps:
        raise TrustgenError(f"{name} holds no complete time step of four voices.")
    grid = np.array(steps, dtype=np.int16)
    for v in range(4):  # a hold needs a note to hold
        column = grid[:, v]
        for step in range(len(column)):
            if column[step] == HOLD and (step == 0 or column[step - 1] == REST):
                column[step] = REST
    return Chorale(name, grid, tuple(sorted(set(bars))) or tuple(range(0, len(grid), 16)))


def parse_text(text: str, name: str = "generated") -> Chorale:
    return parse_tokens(_TOKENS.encode(text), name)


# -- score files (music21) --------------------------------------------------------------------

def chorale_from_score(score: Any, name: str) -> Chorale:
    """A music21 score of exactly four parts (soprano, alto, tenor, bass, top to bottom) on the
    grid: offsets and durations are rounded to 16ths, tied notes merged, a chord's top note kept."""
    parts = list(score.parts)
    if len(parts) != 4:
        raise TrustgenError(f"{name} has {len(parts)} parts, not the four voices soprano, alto, tenor and bass.")
    voices = [_part_notes(part) for part in parts]
    measures = parts[0].getElementsByClass("Measure")
    bars = [_steps(m.offset) for m in measures]
    length = max((_steps(p.highestTime) for p in parts), default=0)
    return chorale_from_notes(name, voices, bars, length)


def _steps(quarter_length: Any) -> int:
    return round(float(quarter_length) * STEPS_PER_QUARTER)


def _part_notes(part: Any) -> list[Note]:
    notes = []
    for element in part.stripTies().flatten().notes:
        if element.duration.isGrace or element.duration.quarterLength == 0:
            continue
        pitch = max(p.midi for p in element.pitches)
        notes.append((_steps(element.offset), max(_steps(element.duration.quarterLength), 1), pitch))
    return sorted(notes)


# The longest piece read, in 16ths (about 1,500 bars of 4/4): far beyond any song or chorale,
# and its grid stays a few MB. Longer files are refused before music21 parses them.
LONGEST_PIECE = 100_000


def _parse_file(path: Path) -> Any:
    if not path.is_file():
        raise TrustgenError(f"{path} does not exist.")
    from music21 import converter

    try:
        if path.suffix.lower() in (".mid", ".midi"):
            _refuse_if_too_long(path, _midi_sixteenths(path))
        score = converter.parse(str(path))
    except TrustgenError:
        raise
    except Exception as exc:  # music21 raises many kinds of errors for broken files
        raise TrustgenError(f"{path} could not be read as a score ({type(exc).__name__}).") from None
    if not getattr(score, "parts", None):
        raise TrustgenError(f"{path} holds no parts.")
    _refuse_if_too_long(path, _steps(score.highestTime))
    return score


def _midi_sixteenths(path: Path) -> int:
    """How long a MIDI file lasts, from its event times alone: music21 spends minutes parsing a
    file whose one note lasts a few thousand bars (it writes out every tied bar)."""
    from music21 import midi

    file = midi.MidiFile()
    file.open(str(path))
    try:
        file.read()
    finally:
        file.close()
    if not file.ticksPerQuarterNote:  # SMPTE time: no quarter notes to count; the parse checks
        return 0
    ticks = max((sum(e.time for e in track.events if isinstance(e, midi.DeltaTime)) for track in file.tracks),
                default=0)
    return ticks * 4 // file.ticksPerQuarterNote


def _refuse_if_too_long(path: Path, sixteenths: int) -> None:
    if sixteenths > LONGEST_PIECE:
        raise TrustgenError(f"{path.name} lasts {sixteenths:,} 16ths; trustgen reads pieces of at most "
                            f"{LONGEST_PIECE:,} (about 1,500 bars of 4/4).")


def read_score(path: str | Path) -> Chorale:
    """A MIDI (.mid, .midi) or MusicXML (.musicxml, .mxl, .xml) file of four voices."""
    path = Path(path)
    chorale = chorale_from_score(_parse_file(path), path.name)
    # A MIDI file's parts are padded with rests to the end of their last bar: drop that padding.
    sounding = np.nonzero((chorale.grid != REST).any(axis=1))[0]
    end = int(sounding[-1]) + 1 if len(sounding) else len(chorale)
    return Chorale(chorale.name, chorale.grid[:end], tuple(b for b in chorale.bars if b < end))


def read_melody(source: str) -> Chorale:
    """A soprano line to harmonize, as the first voice of a chorale whose other voices rest:
    the top part of a MIDI or MusicXML file, or a note list such as "67:4 67:4 69:8 r:4 C5:4"
    (a MIDI pitch or a note name, then the length in 16ths, a quarter note when left out; r rests)."""
    path = Path(source).expanduser()
    if path.suffix.lower() in MUSIC_SUFFIXES:
        part = _parse_file(path).parts[0]
        length = _steps(part.highestTime)
        bars = [_steps(m.offset) for m in part.getElementsByClass("Measure")]
        return chorale_from_notes(path.name, [_part_notes(part), [], [], []], bars, length)
    return melody_from_notes(source, max_steps=LONGEST_PIECE)


def melody_from_notes(source: str, max_steps: int | None = None) -> Chorale:
    """A soprano line from a note list only, such as "67:4 69:4 71:8" (see `read_melody`): for
    callers that must never read a file by the name they are given (the server). `max_steps` is
    checked while reading, before the grid is built: "60:9999999999" must not allocate 80 GB."""
    notes, step = [], 0
    for item in source.replace(",", " ").split():
        name, _, length = item.partition(":")
        try:
            steps = int(length) if length else STEPS_PER_QUARTER
        except ValueError:
            raise TrustgenError(f"the note {item!r} has a length that is not a number of 16ths.") from None
        if steps < 1:
            raise TrustgenError(f"the note {item!r} must last at least one 16th.")
        if max_steps is not None and step + steps > max_steps:
            raise TrustgenError(f"the melody lasts more than {max_steps} 16ths ({max_steps // (4 * STEPS_PER_QUARTER)} bars "
                                f"of 4/4), the most allowed here.")
        if name.lower() != "r":
            notes.append((step, steps, _midi_pitch(name)))
        step += steps
    if not notes:
        raise TrustgenError("the melody has no notes; give a MIDI/MusicXML file or notes like \"67:4 69:4 71:8\".")
    return chorale_from_notes("melody", [notes, [], [], []], length=step)


def _midi_pitch(name: str) -> int:
    if name.isdigit():
        return int(name)
    from music21 import pitch

    try:
        return int(pitch.Pitch(name).midi)
    except Exception:  # music21's pitch parser raises its own error kinds
        raise TrustgenError(f"{name!r} is neither a MIDI pitch nor a note name like C4 or F#5.") from None


def to_score(chorale: Chorale, tempo: int = 80) -> Any:
    """The chorale as a music21 score of four parts, in 4/4 (3/4 where its bars are 12 steps)."""
    from music21 import clef, meter, note, stream
    from music21 import tempo as m21tempo

    bar_lengths = np.diff(chorale.bars)
    three = len(bar_lengths) and float(np.median(bar_lengths)) == 3 * STEPS_PER_QUARTER
    score = stream.Score(id=chorale.name)
    for v, (voice, notes) in enumerate(zip(VOICES, chorale.voice_notes(), strict=True)):
        part = stream.Part(id=voice)
        part.partName = voice.title()
        part.insert(0, clef.TrebleClef() if v < 2 else (clef.Treble8vbClef() if v == 2 else clef.BassClef()))
        part.insert(0, meter.TimeSignature("3/4" if three else "4/4"))
        if v == 0:
            part.insert(0, m21tempo.MetronomeMark(number=tempo))
        for onset, duration, pitch in notes:
            part.insert(onset / STEPS_PER_QUARTER, note.Note(pitch, quarterLength=duration / STEPS_PER_QUARTER))
        end = len(chorale) / STEPS_PER_QUARTER
        if part.highestTime < end:  # a closing rest keeps every part as long as the piece
            part.insert(part.highestTime, note.Rest(quarterLength=end - part.highestTime))
        score.insert(0, part)
    return score


def write_score(chorale: Chorale, path: str | Path) -> Path:
    """Write the chorale as MIDI or MusicXML, chosen by the file's suffix."""
    path = Path(path)
    kind = {".mid": "midi", ".midi": "midi", ".musicxml": "musicxml", ".xml": "musicxml"}.get(path.suffix.lower())
    if kind is None:
        raise TrustgenError(f"{path.name}: write a score as .mid or .musicxml.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        to_score(chorale).write(kind, fp=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- corpora ----------------------------------------------------------------------------------

def is_music_source(source: str) -> bool:
    """`bach`, a music file, or a folder holding music files (and no text files)."""
    if source == "bach":
        return True
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix.lower() in MUSIC_SUFFIXES
    if path.is_dir():
        return any(p.suffix.lower() in MUSIC_SUFFIXES for p in path.rglob("*") if p.is_file())
    return False


def bach_chorales(progress: bool = False) -> list[Chorale]:
    """The chorales of music21's corpus that parse to four voices, read once and then cached."""
    path = cache_dir("music") / f"bach-v{BACH_CACHE_VERSION}.json"
    if path.exists():
        return [Chorale(name, np.array(item["grid"], dtype=np.int16), tuple(item["bars"]))
                for name, item in json.loads(path.read_text()).items()]
    from music21 import corpus

    # Some chorales are listed twice (two Riemenschneider numbers, one BWV file): read each once.
    names = list(dict.fromkeys(corpus.chorales.Iterator(returnType="filename")))
    chorales = []
    for name in _progress(names, progress, "reading Bach's chorales"):
        try:
            chorales.append(chorale_from_score(corpus.parse(name), name.split("/")[-1]))
        except TrustgenError:
            continue  # the chorales with instrumental parts
    if not chorales:
        raise TrustgenError("music21's corpus has no four-voice Bach chorales; reinstall music21.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({c.name: {"grid": c.grid.tolist(), "bars": list(c.bars)} for c in chorales}))
    os.replace(tmp, path)
    return chorales


def _progress(items: list, show: bool, label: str) -> Any:
    if not show:
        yield from items
        return
    from trustgen.progress import progress_bar

    bar = progress_bar(len(items), label)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def find_chorales(source: str, progress: bool = False) -> list[Chorale]:
    """`bach`, one music file, or a folder of them (recursive); files that cannot be read as
    four voices are skipped and named in the log."""
    if source == "bach":
        return bach_chorales(progress)
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MUSIC_SUFFIXES)
    chorales, skipped = [], []
    for file in files:
        try:
            chorales.append(read_score(file))
        except TrustgenError as exc:
            skipped.append(f"{file.name} ({exc})")
    if skipped:
        log.warning(f"skipped {len(skipped)} file(s) that are not four-voice scores: {'; '.join(skipped)}")
    if not chorales:
        raise TrustgenError(f"{source} holds no readable four-voice MIDI or MusicXML file.")
    return chorales


def is_held_out(name: str) -> bool:
    """Bach's fixed held-out set: about one chorale in ten, chosen by a hash of its name, so it
    stays the same when music21 adds or drops chorales."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def split_chorales(source: str, chorales: list[Chorale], val_fraction: float,
                   seed: int) -> tuple[list[Chorale], list[Chorale]]:
    """Hold out whole chorales: Bach's fixed set, or a seeded `val_fraction` of a folder."""
    if len(chorales) < 2:
        raise TrustgenError(f"{source} has {len(chorales)} piece; give at least two, so one can be held out.")
    if source == "bach":
        held = {c.name for c in chorales if is_held_out(c.name)}
    else:
        order = np.random.default_rng(seed).permutation(len(chorales))
        count = min(max(1, round(val_fraction * len(chorales))), len(chorales) - 1)
        held = {chorales[i].name for i in order[:count]}
    return [c for c in chorales if c.name not in held], [c for c in chorales if c.name in held]


def voice_ranges(chorales: Sequence[Chorale]) -> tuple[np.ndarray, np.ndarray]:
    """Each voice's lowest and highest pitch over the chorales."""
    lows, highs = zip(*(c.pitch_range() for c in chorales), strict=True)
    return np.min(lows, axis=0), np.max(highs, axis=0)


def transpositions(chorales: Sequence[Chorale]) -> list[Chorale]:
    """Every chorale moved to the other 11 keys (-6 to +5 semitones) where all four voices stay
    inside the ranges the voices have over the chorales given."""
    low, high = voice_ranges(chorales)
    moved = []
    for chorale in chorales:
        c_low, c_high = chorale.pitch_range()
        for k in range(-6, 6):
            if k and np.all(c_low + k >= low) and np.all(c_high + k <= high):
                moved.append(chorale.transposed(k))
    return moved


__all__ = ["HOLD", "REST", "VOICES", "Chorale", "bach_chorales", "chorale_from_notes", "chorale_from_score",
           "chorale_text", "find_chorales", "is_music_source", "melody_from_notes", "parse_text", "parse_tokens",
           "read_melody", "read_score", "split_chorales", "to_score", "transpositions", "write_score"]
