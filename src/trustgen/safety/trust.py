"""The trust workflow, in one place: which watermark, which keys, what the manifest claims,
and how a generated file is watermarked and signed. The Python API, the CLI, the demo and the
server all go through here; none of them builds a watermark, a claim or a signature itself.

It works on primitives (a model id, a family, a vocabulary size, a tokenizer file, a keystore),
never on a loaded model, so it sits below the API:

    keys = Keys(path)                          # keys made the first time one is needed
    text = TextTrust(keys, model_id=..., family="gpt", vocab_size=65, tokenizer_file=...,
                     watermark="kgw", settings={...}, seed=1)
    text.processors                            # the watermark, to append to the sampling chain
    text.save(path, content)                   # write, then sign (a sidecar FILE.manifest.json)
    images = ImageTrust(keys, model_id=..., family="vae", watermark="spectral", settings={...}, seed=1)
    images.save(picture, path)                 # watermark the pixels, write the PNG, then sign it

Manifests carry the watermark's scheme and public key id (`Mark`), never a key. Detection and
verification (trustgen.safety.authenticity) are re-exported here, so a face imports one module.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from trustgen.errors import TrustgenError
from trustgen.io import atomic_write_bytes, atomic_write_text
from trustgen.safety import provenance
from trustgen.safety.authenticity import (
    DETECT_EXIT_CODES,
    TOO_SHORT,
    TextDetection,
    artifact_text,
    detect_audio,
    detect_image,
    detect_pixels,
    detect_text,
    minimum_tokens,
    read_image,
    remember_tokenizer,
    remember_tokenizer_text,
    summary_line,
    verify_file,
)
from trustgen.safety.keys import Keystore, SigningIdentity, WatermarkKey
from trustgen.safety.watermark import audio as audio_watermark
from trustgen.safety.watermark import image as image_watermark
from trustgen.safety.watermark.image import ImageDetection
from trustgen.safety.watermark.text import (
    DETECT_ONLY,
    RETIRED_BECAUSE,
    SCHEMES,
    default_context_width,
    highlight,
    make_watermark,
)
from trustgen.sample.images import png_bytes
from trustgen.sample.music import wav_bytes
from trustgen.sample.processors import LogitsProcessor

__all__ = [
    "AUDIO_WATERMARK", "DEFAULT_IMAGE_WATERMARK", "DEFAULT_TEXT_WATERMARK", "DETECTABLE_TEXT_WATERMARKS",
    "DETECT_EXIT_CODES", "IMAGE_WATERMARKS", "TEXT_WATERMARKS",
    "TOO_SHORT", "VERIFY_EXIT_CODES", "Artifact", "ImageDetection", "ImageTrust", "Keys", "Keystore", "Mark",
    "TextDetection", "TextTrust", "artifact_text", "detect_audio", "detect_image", "detect_pixels", "detect_text", "highlight", "is_wav",
    "minimum_tokens", "read_image", "sidecar_path", "summary_line", "verify", "verify_file",
]

TEXT_WATERMARKS = tuple(SCHEMES)  # kgw, synthid
DETECTABLE_TEXT_WATERMARKS = (*SCHEMES, *DETECT_ONLY)  # and gumbel, kgw-selfhash: text an older trustgen made
IMAGE_WATERMARKS = (image_watermark.SCHEME,)  # spectral
AUDIO_WATERMARK = audio_watermark.SCHEME  # a watermarked music generation's WAV carries this one
# The faces' defaults (the CLI and the server mark everything); the Python API marks only when asked.
DEFAULT_TEXT_WATERMARK = "kgw"
DEFAULT_IMAGE_WATERMARK = image_watermark.SCHEME
sidecar_path = provenance.sidecar_path  # where a text file's manifest lives
is_wav = provenance.is_wav  # by its first bytes: a WAV is tested for the audio watermark
VERIFY_EXIT_CODES = provenance.EXIT_CODES  # trustgen verify: 0 only for "verified"
log = logging.getLogger("trustgen")


def _scheme(requested: str | None, allowed: tuple[str, ...]) -> str | None:
    """The scheme asked for, None for no watermark ("none" or None)."""
    if requested in DETECT_ONLY:
        raise TrustgenError(f"{requested} only tests text made before it was retired: it {RETIRED_BECAUSE[requested]}.")
    if requested is None or requested == "none":
        return None
    if requested not in allowed:
        raise TrustgenError(f"unknown watermark scheme {requested!r}; choose {', '.join(allowed)} or none.")
    return requested


@dataclass(frozen=True)
class Mark:
    """A watermark as a manifest records it: the scheme and the key's public id, never the key."""

    scheme: str
    key_id: str

    def to_dict(self) -> dict[str, str]:
        return {"scheme": self.scheme, "key_id": self.key_id}


class Keys:
    """A keystore whose watermark key and signing identity are made the first time either is
    needed, if the keystore does not exist yet (and announced, without any secret, through
    `announce`; None stays silent). Once it exists nothing is made implicitly: a missing key is
    an error naming the file and the command that restores it. The watermark key is read once."""

    def __init__(self, path: str | Path | None = None, *,
                 announce: Callable[[str], None] | None = log.info) -> None:
        self._store = Keystore(Path(path) if path is not None else None)
        self._announce = announce
        self._ready = False

    @classmethod
    def of(cls, keystore: str | Path | Keys | None) -> Keys:
        return keystore if isinstance(keystore, Keys) else cls(keystore)

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def existing(self) -> Keystore:
        """The keystore as it is, nothing made (for checking files)."""
        return self._store

    def store(self) -> Keystore:
        """The keystore, made now if it does not exist yet, and checked: both keys readable."""
        if not self._ready:
            store = self._store
            if not store.exists():
                key = store.init()
                if self._announce is not None:
                    self._announce(f"created keys in {store.path}: watermark key {key.key_id}, signer "
                                   f"'{store.signing_identity().name}'")
            store.watermark_key(), store.signing_identity()  # a missing or broken key stops us here
            self._ready = True
        return self._store

    @cached_property
    def _watermark_key(self) -> WatermarkKey:
        return self.store().watermark_key()

    def watermark_key(self) -> WatermarkKey:
        return self._watermark_key

    def signing_identity(self) -> SigningIdentity:
        return self.store().signing_identity()

    def remember_tokenizer(self, tokenizer_file: Path | None = None,
                           tokenizer_json: str | Callable[[], str] | None = None) -> str:
        """Keep a copy of the tokenizer (its file, or its JSON text) in the keystore, so text can
        be tested without its run; returns its SHA-256."""
        if tokenizer_file is not None:
            return remember_tokenizer(self.store(), Path(tokenizer_file))
        if tokenizer_json is None:
            raise TrustgenError("name the tokenizer by its file or its JSON text.")
        return remember_tokenizer_text(self.store(), tokenizer_json() if callable(tokenizer_json) else tokenizer_json)


@dataclass(frozen=True)
class Artifact:
    """A written file: where it is, the file holding its manifest (the sidecar of a text, the
    image itself; None when unsigned), its watermark, and the keystore to check it with."""

    path: Path
    manifest: Path | None
    watermark: Mark | None
    keystore: Path
    note: str | None = None  # why a watermark asked for is not there (an image too small to carry it)

    def verify(self, anchors: list[Path] | None = None) -> dict[str, Any]:
        """The manifest's verdict and the watermark's (see trustgen verify)."""
        return verify(self.path, self.keystore, anchors)

    def summary(self) -> str:
        return summary_line(self.verify())


def verify(path: str | Path, keystore: str | Path | Keys | None = None,
           anchors: list[Path] | None = None) -> dict[str, Any]:
    """Check a file's manifest (trusted: signed under the keystore's CA, or one of `anchors`) and
    its watermark; see trustgen.safety.authenticity.verify_file."""
    store = keystore.existing if isinstance(keystore, Keys) else Keystore(Path(keystore) if keystore else None)
    return verify_file(Path(path), store, anchors)


class _Trust:
    """What text and images share: the claim and signing."""

    def __init__(self, keys: Keys, *, model_id: str | Callable[[], str], family: str,
                 settings: Mapping[str, Any], seed: int | None, privacy: str | None = None) -> None:
        self.keys = keys
        self.privacy = privacy  # a private model's guarantee, "trained with (eps, delta)-DP, unit: ..."
        self._model_id = model_id
        self.family = family
        self.settings = dict(settings)
        self.seed = seed
        self.mark: Mark | None = None

    def _use(self, scheme: str) -> None:
        self.mark = Mark(scheme, self.keys.watermark_key().key_id)  # makes the keys if there are none

    @property
    def model_id(self) -> str:
        return self._model_id() if callable(self._model_id) else self._model_id

    def claim(self) -> dict[str, Any]:
        """What the manifest records about this generation: the model by its weights' hash, the
        settings, the seed and the watermark's scheme and key id (never a key)."""
        return self._claim(self.mark)

    def _claim(self, mark: Mark | None, note: str | None = None) -> dict[str, Any]:
        key = None if mark is None else self.keys.watermark_key()
        claim = provenance.generation_claim(model_id=self.model_id, family=self.family, settings=self.settings,
                                            seed=self.seed, watermark=key, scheme=None if mark is None else mark.scheme)
        if note is not None:  # a watermark was asked for and is not there: say why
            claim["watermark_note"] = note
        if self.privacy is not None:
            claim["privacy"] = self.privacy
        return claim

    def _artifact(self, path: Path, sign: bool, mark: Mark | None, note: str | None = None) -> Artifact:
        manifest = provenance.sign(path, self._claim(mark, note), self.keys.signing_identity()) if sign else None
        return Artifact(path, manifest, mark, self.keys.path, note)

    def written(self, path: str | Path, *, sign: bool = True) -> Artifact:
        """A file this generation already wrote (a score whose notes carry its mark), signed
        with its claim when `sign`: a C2PA manifest inside a picture or WAV, else a sidecar."""
        return self._artifact(Path(path), sign, self.mark)

    def save_audio(self, audio: np.ndarray, path: str | Path, *, sample_rate: int, sign: bool = True) -> Artifact:
        """Write mono float audio as a 16-bit WAV (atomically): with the audio watermark under this
        generation's key when it is watermarked and the detector finds the mark once embedded,
        then, with `sign`, a C2PA manifest inside the WAV that records the watermark or why
        there is none."""
        path = Path(path)
        mark, note = None, None
        if self.mark is not None:
            key = self.keys.watermark_key()
            marked = audio_watermark.embed(audio, sample_rate, key.secret)
            found = audio_watermark.detect(marked, sample_rate, {key.key_id: key.secret}).verdict == "watermarked"
            if found:
                audio, mark = marked, Mark(audio_watermark.SCHEME, key.key_id)
            else:
                note = (f"not watermarked (the detector did not find the audio mark after embedding it; it needs "
                        f"{audio_watermark.MIN_SECONDS:g} s or more of sound)")
        atomic_write_bytes(path, wav_bytes(audio, sample_rate))
        return self._artifact(path, sign, mark, note)


class TextTrust(_Trust):
    """How one text generation is watermarked and signed.

    `watermark`: kgw, synthid, or None/"none". The tokenizer (its file, or its JSON
    text for a model without a run directory) is remembered in the keystore when text is
    watermarked, and its hash goes into the claim, so `detect` needs no run."""

    def __init__(self, keys: Keys, *, model_id: str | Callable[[], str], family: str, vocab_size: int,
                 tokenizer_file: Path | None = None, tokenizer_json: str | Callable[[], str] | None = None,
                 watermark: str | None = None, settings: Mapping[str, Any] | None = None,
                 seed: int | None = None, privacy: str | None = None) -> None:
        scheme = _scheme(watermark, TEXT_WATERMARKS)
        super().__init__(keys, model_id=model_id, family=family, settings=settings or {}, seed=seed,
                         privacy=privacy)
        self.vocab_size = vocab_size
        self._tokenizer = (tokenizer_file, tokenizer_json)
        if scheme is not None:
            self._use(scheme)

    @cached_property
    def tokenizer_sha256(self) -> str:
        return self.keys.remember_tokenizer(*self._tokenizer)

    @cached_property
    def processors(self) -> list[LogitsProcessor]:
        """The watermark as logits processors to run after the sampling chain ([] for none)."""
        if self.mark is None:
            return []
        self.tokenizer_sha256  # noqa: B018 - remembered now, so a detector finds the tokenizer
        return [make_watermark(self.mark.scheme, self.keys.watermark_key().secret, self.vocab_size,
                               self.context_width)]

    @cached_property
    def context_width(self) -> int | None:
        """Previous tokens the watermark hashes (None without one); recorded in the claim, so a
        text keeps being tested as it was made when a later version changes the default."""
        return None if self.mark is None else default_context_width(self.mark.scheme, self.vocab_size)

    def _claim(self, mark: Mark | None, note: str | None = None) -> dict[str, Any]:
        claim = super()._claim(mark, note)
        if mark is not None and mark.scheme in TEXT_WATERMARKS:  # so a detector can find the tokenizer without the run
            claim["tokenizer_sha256"] = self.tokenizer_sha256
            claim["watermark"]["context_width"] = self.context_width
        return claim

    def save(self, path: str | Path, content: str, *, sign: bool = True) -> Artifact:
        """Write the text (atomically) and, with `sign`, its signed sidecar manifest."""
        path = Path(path)
        atomic_write_text(path, content)
        return self._artifact(path, sign, self.mark)

    def detect(self, text: str, window: int = 200) -> TextDetection:
        """Test a text for the keystore's watermark with this generation's tokenizer (and scheme)."""
        return detect_text(text, self.keys.store(), scheme=None if self.mark is None else self.mark.scheme,
                           tokenizer_sha=self.tokenizer_sha256, window=window, context_width=self.context_width)


@dataclass(frozen=True)
class MarkedPicture:
    """A picture's pixels as written, with its watermark, or the note saying why it has none."""

    pixels: np.ndarray
    watermark: Mark | None
    note: str | None


class ImageTrust(_Trust):
    """How one image generation is watermarked and signed: the watermark goes into the pixels of
    the picture written (a whole grid carries one mark), then the manifest, whose hash covers
    those watermarked pixels. `watermark`: spectral, or None/"none"."""

    def __init__(self, keys: Keys, *, model_id: str | Callable[[], str], family: str,
                 watermark: str | None = None, settings: Mapping[str, Any] | None = None,
                 seed: int | None = None, privacy: str | None = None) -> None:
        scheme = _scheme(watermark, IMAGE_WATERMARKS)
        super().__init__(keys, model_id=model_id, family=family, settings=settings or {}, seed=seed,
                         privacy=privacy)
        if scheme is not None:
            self._use(scheme)

    def marked(self, picture: np.ndarray) -> MarkedPicture:
        """The picture (H, W, C) uint8 with the watermark in its pixels, if it can carry one: a
        picture smaller than the mark supports, or one in which the detector does not find the
        mark after embedding, is left as it is and never claimed as watermarked."""
        if self.mark is None:
            return MarkedPicture(picture, None, None)
        height, width = picture.shape[:2]
        if min(height, width) < image_watermark.MIN_SIDE:
            return MarkedPicture(picture, None, f"not watermarked (image too small: {width}x{height}; the "
                                                f"{self.mark.scheme} mark needs at least {image_watermark.MIN_SIDE} "
                                                "pixels a side)")
        key = self.keys.watermark_key()
        pixels = image_watermark.embed(picture, key.secret)
        if image_watermark.detect(pixels, {key.key_id: key.secret}).verdict != "watermarked":
            return MarkedPicture(picture, None, "not watermarked (the detector did not find the mark after "
                                                "embedding it in this image)")
        return MarkedPicture(pixels, self.mark, None)

    def watermarked(self, picture: np.ndarray) -> np.ndarray:
        """The picture (H, W, C) uint8 with the watermark in its pixels (as it is, without one)."""
        return self.marked(picture).pixels

    def save(self, picture: np.ndarray, path: str | Path, *, sign: bool = True) -> Artifact:
        """Watermark the picture (H, W, C) when it can carry the mark, write it as PNG
        (atomically), then embed the C2PA manifest, which records the watermark or why there is none."""
        path = Path(path)
        marked = self.marked(picture)
        atomic_write_bytes(path, png_bytes(marked.pixels))
        return self._artifact(path, sign, marked.watermark, marked.note)

    def png(self, picture: np.ndarray, name: str = "image.png", *, sign: bool = True) -> bytes:
        """The watermarked (and signed) picture as PNG file bytes; `name` is the manifest's title."""
        return self.encoded(picture, name, sign=sign)[0]

    def encoded(self, picture: np.ndarray, name: str = "image.png", *,
                sign: bool = True) -> tuple[bytes, Artifact]:
        """`png`, with what was written: its watermark, or the note saying why there is none
        (the artifact's paths are gone once this returns)."""
        with tempfile.TemporaryDirectory() as folder:
            target = Path(folder) / Path(name).name
            written = self.save(picture, target, sign=sign)
            return target.read_bytes(), written

    def detect(self, picture: np.ndarray) -> ImageDetection:
        """Test pixels (H, W, C) for the keystore's watermarks."""
        return detect_pixels(picture, self.keys.store())
