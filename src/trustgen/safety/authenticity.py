"""Is this file generated, by whom, and is it intact? Detection and verification together.

A signed manifest says who made a file and whether it changed since; a watermark survives what
a manifest does not (edits, copying the text somewhere else, stripping the sidecar). `verify`
reports both. Text detection needs the text, the tokenizer that made it and the key, not the
model: every tokenizer trustgen has watermarked with is remembered in the keystore (tokenizers
are public; only keys are secret), so a text can be tested without naming its run. When the
tokenizer and scheme are unknown, each remembered (tokenizer, scheme) pair is tried and the
best p-value is multiplied by the number of pairs tried (Bonferroni), so trying more never
makes a human text look watermarked. A text too short to decide gets no verdict but "too short
to tell" with the minimum (see `minimum_tokens`), never a confident "no watermark found". Images are tested with every watermark key in the
keystore (`spectral`, see trustgen.safety.watermark.image), with the same correction; WAV audio
likewise (`stft-patchwork`, see trustgen.safety.watermark.audio).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import shutil
import warnings
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from trustgen.data.music import MUSIC_SUFFIXES, chorale_text, read_score
from trustgen.data.tokenizers import Tokenizer, load_tokenizer
from trustgen.errors import TrustgenError
from trustgen.io import file_sha256
from trustgen.safety import provenance
from trustgen.safety.keys import Keystore
from trustgen.safety.watermark import audio as audio_watermark
from trustgen.safety.watermark import image as image_watermark
from trustgen.safety.watermark.canonical import Tampering, canonicalize
from trustgen.safety.watermark.text import (
    LEGACY_CONTEXT_WIDTHS,
    SCHEMES,
    Detection,
    KGWWatermark,
    detect_windowed,
    highlight,
    make_watermark,
)
from trustgen.sample.music import read_wav

ALPHA = 1e-3  # a text is called watermarked below this (corrected) p-value
TOO_SHORT = "too short to tell"
# The exit code of `trustgen detect` for each verdict (2 stays the code of a user error).
DETECT_EXIT_CODES = {"watermarked": 0, "no watermark found": 1, TOO_SHORT: 3}
_KGW_GAMMA = inspect.signature(KGWWatermark).parameters["gamma"].default


def minimum_tokens(candidates: int = 1) -> int:
    """The fewest scored tokens below which a text gets no verdict: the fewest at which even a
    fully watermarked text could be called watermarked. Under KGW each scored token of human
    text is green with probability γ (0.25), so n tokens, all green, have p = γ^n; times the
    `candidates` (tokenizer, scheme) pairs tried it must fall below ALPHA, so n > log(ALPHA /
    candidates) / log γ: 5 tokens for one candidate, 6 for the three schemes tried by default. Below that,
    "no watermark found" would be said of every text, watermarked or not. (Gumbel's statistic
    is unbounded, so KGW is the scheme that needs the most tokens.)"""
    return math.floor(math.log(ALPHA / max(1, candidates)) / math.log(_KGW_GAMMA)) + 1


def remember_tokenizer(store: Keystore, tokenizer_file: Path) -> str:
    """Keep a copy of a tokenizer that watermarked text was made with; returns its SHA-256."""
    digest = file_sha256(tokenizer_file)
    folder = store.path / "tokenizers"
    target = folder / f"{digest}.json"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(tokenizer_file, tmp)
        tmp.replace(target)
    return digest


def remember_tokenizer_text(store: Keystore, tokenizer_json: str) -> str:
    """`remember_tokenizer` for a tokenizer that is not in a file (a model built in Python):
    its JSON text, as Tokenizer.save would write it."""
    data = tokenizer_json.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    target = store.path / "tokenizers" / f"{digest}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return digest


def known_tokenizers(store: Keystore) -> dict[str, Path]:
    folder = store.path / "tokenizers"
    return {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


@dataclass(frozen=True)
class TextDetection:
    """The verdict on a text: the best (tokenizer, scheme) tried, with a corrected p-value."""

    verdict: str  # "watermarked", "no watermark found" or "too short to tell" (see minimum_tokens)
    scheme: str
    key_id: str
    tokenizer: str  # SHA-256 of the tokenizer file
    tokens: int
    whole: Detection
    window: Any  # WindowDetection of the best window
    p_value: float  # min(whole, window) p-value times the number of candidates tried
    candidates: int
    pieces: list[str] = field(default_factory=list)  # the text cut into its tokens, for highlighting
    minimum: int = 0  # scored tokens needed for a verdict (minimum_tokens(candidates))
    tampering: Tampering = field(default_factory=Tampering)  # what canonicalization undid

    def highlight(self, html: bool = False) -> str:
        """The text with its watermarked tokens in green (ANSI colours, or an HTML page)."""
        return highlight(self.pieces, self.whole.green_flags, html=html)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "scheme": self.scheme, "key_id": self.key_id, "tokenizer": self.tokenizer,
                "tokens": self.tokens, "scored": self.whole.scored, "z_score": self.whole.z_score,
                "minimum_scored": self.minimum, "p_value": self.p_value, "candidates_tried": self.candidates,
                "window": {"start": self.window.start, "end": self.window.end, "z_score": self.window.z_score,
                           "p_value": self.window.p_value},
                "tampering": self.tampering.to_dict()}


def detect_text(text: str, store: Keystore, *, run: Path | None = None, scheme: str | None = None,
                tokenizer_sha: str | None = None, window: int = 200,
                context_width: int | None = None) -> TextDetection:
    """Test a text for the keystore's watermark.

    The tokenizer is the run's when `run` is given, else the one named by `tokenizer_sha`
    (from a manifest), else every tokenizer the keystore remembers; the scheme is `scheme`,
    else each known one, hashing `context_width` previous tokens (a manifest's; default: the
    scheme's for the vocabulary). The text is canonicalized first (invisible characters removed,
    look-alike letters folded: see trustgen.safety.watermark.canonical), and what that undid is
    reported as `tampering`; the pieces highlighted are those of the canonical text.
    """
    key = store.watermark_key()
    if run is not None:
        path = Path(run) / "tokenizer.json"
        if not path.is_file():
            raise TrustgenError(f"{run} is not the run directory of a text model (it has no tokenizer.json).")
        tokenizers = {file_sha256(path): path}
    else:
        tokenizers = known_tokenizers(store)
        if tokenizer_sha is not None and tokenizer_sha in tokenizers:
            tokenizers = {tokenizer_sha: tokenizers[tokenizer_sha]}
        if not tokenizers:
            raise TrustgenError(f"the keystore {store.path} remembers no tokenizer yet (it learns one each time "
                                "trustgen generates watermarked text); name the model with --run RUN.")
    schemes = [scheme] if scheme is not None else list(SCHEMES)
    candidates = len(tokenizers) * len(schemes)
    minimum = minimum_tokens(candidates)
    text, tampering = canonicalize(text)
    found = []
    for digest, path in tokenizers.items():
        tokenizer = load_tokenizer(path)
        ids = tokenizer.encode_for_detection(text)
        for name in schemes:
            mark = make_watermark(name, key.secret, tokenizer.vocab_size, context_width)
            whole, windowed = mark.detect(ids), detect_windowed(mark, ids, window)
            p = min(1.0, min(whole.p_value, windowed.p_value) * candidates)
            verdict = (TOO_SHORT if whole.scored < minimum else "watermarked" if p < ALPHA
                       else "no watermark found")
            found.append(TextDetection(verdict, name, key.key_id, digest, len(ids), whole, windowed, p, candidates,
                                       _pieces(tokenizer, text, ids), minimum, tampering))
    # A pair that scored too few tokens gives no verdict; the text is too short only when every
    # pair did (the Bonferroni factor still counts every pair tried).
    decided = [detection for detection in found if detection.verdict != TOO_SHORT] or found
    return min(decided, key=lambda detection: detection.p_value)


def _pieces(tokenizer: Tokenizer, text: str, ids: list[int]) -> list[str]:
    """The text cut into its tokens, for highlighting."""
    if tokenizer.kind == "char":  # one id per character, unknown ones (-1) included
        return list(text)
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


IMAGE_FORMATS = ["PNG", "JPEG", "WEBP"]  # decoders that only parse pixels (never EPS, which runs Ghostscript)
MAX_IMAGE_PIXELS = 6000 * 6000  # larger images are refused before they are decoded


def read_image(source: Path | bytes) -> np.ndarray | None:
    """A file's (or its bytes') pixels as uint8 (H, W, 1) or (H, W, 3), or None when it is not a
    PNG, JPEG or WebP image. Decoding only parses pixels: nothing in the file is executed."""
    path = "the image" if isinstance(source, bytes) else source  # for messages
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS)
        with opened as picture:
            if picture.width * picture.height > MAX_IMAGE_PIXELS:
                raise TrustgenError(f"{path} is {picture.width}x{picture.height} pixels; images over "
                                    f"{MAX_IMAGE_PIXELS:,} pixels are not tested.")
            if picture.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # deep greys: scale, do not clip at 255
                deep = np.asarray(picture, dtype=np.float64)
                top = 65535.0 if deep.max() > 255 else 255.0
                return np.clip(deep / top * 255 + 0.5, 0, 255).astype(np.uint8)[:, :, None]
            grey = picture.mode in ("1", "L", "LA")
            pixels = np.asarray(picture.convert("L" if grey else "RGB"))
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError:
        raise TrustgenError(f"{path} claims more than {MAX_IMAGE_PIXELS:,} pixels; it is not tested.") from None
    except OSError as exc:
        raise TrustgenError(f"{path} looks like an image but cannot be decoded ({exc}).") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def detect_image(source: Path | bytes, store: Keystore) -> image_watermark.ImageDetection:
    """Test an image file (or its bytes) for the watermark of every key in the keystore."""
    pixels = read_image(source)
    if pixels is None:
        name = "the upload" if isinstance(source, bytes) else source
        raise TrustgenError(f"{name} is not an image trustgen can read (PNG, JPEG, WebP, ...).")
    return detect_pixels(pixels, store)


def detect_pixels(pixels: np.ndarray, store: Keystore) -> image_watermark.ImageDetection:
    """Test decoded pixels (see read_image) for the watermark of every key in the keystore."""
    keys = {key.key_id: key.secret for key in store.watermark_keys()}
    if not keys:
        raise TrustgenError(f"there is no watermark key in {store.path}; run: trustgen keys init")
    return image_watermark.detect(pixels, keys)


def detect_audio(path: Path, store: Keystore) -> audio_watermark.AudioDetection:
    """Test a WAV file for the audio watermark of every key in the keystore."""
    try:
        audio, sample_rate = read_wav(Path(path).read_bytes())
    except (ValueError, EOFError, wave.Error) as exc:
        raise TrustgenError(f"{path} is not a WAV file trustgen can read ({exc}).") from None
    keys = {key.key_id: key.secret for key in store.watermark_keys()}
    if not keys:
        raise TrustgenError(f"there is no watermark key in {store.path}; run: trustgen keys init")
    return audio_watermark.detect(audio, sample_rate, keys)


def verify_file(path: Path, store: Keystore, trust: list[Path] | None = None) -> dict[str, Any]:
    """The manifest's verdict, one `status` (verified / modified / untrusted / invalid / missing,
    see provenance; only "verified" may be relied on) with its detail (signer, content, claim),
    and beside it whether the watermark is there: a watermark survives edits and stripping, so it
    says "generated with this key", never "authentic"."""
    path = Path(path)
    if not path.is_file():
        raise TrustgenError(f"{path} does not exist.")
    anchors = [p.read_bytes() for p in trust] if trust else store.trust_anchors()
    result = provenance.verify(path, anchors)
    report: dict[str, Any] = {"file": str(path), **result.to_dict(), "summary": result.summary()}
    if result.status == "untrusted" and not trust:
        report.update(_retired_signer(path, store))
    claim = result.claim or {}
    mark = claim.get("watermark") or {}
    lacking = mark.get("key_id") and store.has_watermark_key() and mark["key_id"] not in {
        key.key_id for key in store.watermark_keys()}
    if not store.has_watermark_key():
        report["watermark"] = {"checked": False, "reason": f"no watermark key in {store.path}"}
    elif lacking:
        report["watermark"] = {"checked": False, "reason": (
            f"the manifest names watermark key {mark['key_id']}, which {store.path} lacks "
            f"(watermark-{mark['key_id']}.key); restore it from your backup to test this file")}
    elif provenance.is_image(path):
        report["watermark"] = {"checked": True, **detect_image(path, store).to_dict()}
    elif provenance.is_wav(path):
        report["watermark"] = {"checked": True, **detect_audio(path, store).to_dict()}
    else:
        text = artifact_text(path)
        try:
            found = detect_text(text, store, scheme=mark.get("scheme"), tokenizer_sha=claim.get("tokenizer_sha256"),
                                context_width=_context_width(mark))
            report["watermark"] = {"checked": True, **found.to_dict()}
        except TrustgenError as exc:
            report["watermark"] = {"checked": False, "reason": str(exc)}
    return report


def _context_width(mark: dict[str, Any]) -> int | None:
    """The context width a manifest's watermark was made with: recorded since it became a
    setting, the scheme's old fixed width before (None without a scheme or with a bad value)."""
    width = mark.get("context_width", LEGACY_CONTEXT_WIDTHS.get(mark.get("scheme")))
    return width if isinstance(width, int) and 1 <= width <= 64 else None


def _retired_signer(path: Path, store: Keystore) -> dict[str, Any]:
    """For a file signed under a CA this keystore retired (trustgen keys init --new-signer): which
    one, so "untrusted" is explained rather than a mystery. Nothing when no retired CA signed it."""
    for ca, pem in store.retired_anchors().items():
        if provenance.verify(path, [pem]).status == "verified":
            return {"retired_ca": str(ca), "summary": (
                f"untrusted: signed under this keystore's retired CA {ca.name} (replaced by trustgen keys init "
                f"--new-signer); if its key was not compromised, trust it with --trust {ca}; content unmodified")}
    return {}


# Files are told apart by their first bytes; one named like these that got here has other bytes.
_MEDIA_SUFFIXES = {".wav": "a WAV file", ".wave": "a WAV file", ".png": "a PNG image", ".jpg": "a JPEG image",
                   ".jpeg": "a JPEG image"}


def artifact_text(path: Path) -> str:
    """What a text watermark is tested on: a text file's text, or a score's (MIDI, MusicXML)
    music tokens, read back from the notes alone."""
    if path.suffix.lower() in MUSIC_SUFFIXES:
        return chorale_text(read_score(path))
    if path.suffix.lower() in _MEDIA_SUFFIXES:  # not tested as text: "too short to tell" would mislead
        raise TrustgenError(f"{path.name} is named like {_MEDIA_SUFFIXES[path.suffix.lower()]} but is not one "
                            "(its first bytes say otherwise).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TrustgenError(f"{path} is neither an image, a score nor UTF-8 text.") from None


def summary_line(report: dict[str, Any]) -> str:
    mark = report["watermark"]
    if not mark["checked"]:
        shown = f"watermark not checked ({mark['reason']})"
    elif mark["verdict"] == "watermarked":
        shown = f"watermark present ({mark['scheme']}, key {mark['key_id']}, p = {mark['p_value']:.1e})"
    elif mark["verdict"] == TOO_SHORT and "scored" not in mark:  # audio
        shown = f"watermark: {TOO_SHORT} ({mark['seconds']:.1f} s, {audio_watermark.MIN_SECONDS:g} s needed)"
    elif mark["verdict"] == TOO_SHORT:
        shown = f"watermark: {TOO_SHORT} ({mark['scored']} scored tokens, {mark['minimum_scored']} needed)"
    else:
        shown = f"no watermark found (p = {mark['p_value']:.2f})"
    signs = mark.get("tampering") or {}
    if signs.get("tampering_suspected"):
        shown += "; " + Tampering(signs["invisible_removed"], signs["confusables_folded"]).describe()
    return f"{report['file']}: {report['summary']}; {shown}"
