"""Tokenizers: `char` (vocabulary from the corpus), `byte` (256 ids), `bpe` (byte-level BPE
trained with Hugging Face `tokenizers`) and `music` (four-voice scores on a 16th-note grid, as
written by trustgen.data.music).

All four share one interface, and all four describe every token as raw bytes
(`token_bytes`), so decoding and streaming work the same way for each: join the bytes, decode
UTF-8. A run directory stores its tokenizer as `tokenizer.json`; for `bpe` that file is a plain
Hugging Face tokenizer file, so it can be used from `transformers` directly.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from trustgen.errors import TrustgenError


class Tokenizer(ABC):
    """Text <-> token ids, with every token also known as its bytes."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def to_json(self) -> str: ...

    @abstractmethod
    def to_hf_json(self) -> tuple[str, str]:
        """This tokenizer as a Hugging Face `tokenizers` file (what `AutoTokenizer` loads, with
        the same ids), and a few words on what that file holds."""

    @cached_property
    @abstractmethod
    def token_bytes(self) -> list[bytes]: ...

    def encode_array(self, text: str) -> np.ndarray:
        """Encode a large chunk of text straight into a numpy array (the corpus path)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_for_detection(self, text: str) -> list[int]:
        """Ids for a watermark detector, which must read any text: as `encode`, except that a
        character the tokenizer cannot represent becomes -1, a token no detector scores."""
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def save(self, path: Path) -> None:
        from trustgen.io import atomic_write_text

        atomic_write_text(path, self.to_json())

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class StreamDecoder:
    """Turns tokens into text one at a time without ever splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._table = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._table[token])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# The Hugging Face form of a char tokenizer: every character is one piece. The unknown token is
# not in the vocabulary, so text with an unseen character fails to encode, as it does here.
_HF_ONE_CHARACTER = "(?m)."
_HF_UNKNOWN = "[UNK]"


def _hf_word_level(vocab: dict[str, int], word: str) -> str:
    """A Hugging Face WordLevel tokenizer of `vocab` behind a split that isolates each match of
    the regex `word`, the words fused back together on decoding."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=_HF_UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str()


class CharTokenizer(Tokenizer):
    """One id per Unicode character seen in the training corpus (sorted by code point)."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise TrustgenError("cannot build a char tokenizer from an empty corpus.")
        self.chars = "".join(sorted(set(chars)))
        self._index = {c: i for i, c in enumerate(self.chars)}
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def train(cls, chunks: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for chunk in chunks:
            seen.update(chunk)
        return cls("".join(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            raise self._unknown(text) from None

    def encode_for_detection(self, text: str) -> list[int]:
        # One id per character, known or not: an unseen character (a curly quote added by an
        # editor, a word from another alphabet) breaks the contexts around it, not the whole text.
        return [self._index.get(c, -1) for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, points)
        np.minimum(ids, len(self._codepoints) - 1, out=ids)
        if not np.array_equal(self._codepoints[ids], points):
            raise self._unknown(text)
        return ids.astype(np.int64, copy=False)

    def _unknown(self, text: str) -> TrustgenError:
        missing = sorted(set(text) - set(self.chars))
        shown = ", ".join(repr(c) for c in missing[:10]) + (" …" if len(missing) > 10 else "")
        return TrustgenError(
            f"the text has {len(missing)} character(s) this char tokenizer never saw in training "
            f"({shown}); it knows {self.vocab_size} characters.")

    @cached_property
    def token_bytes(self) -> list[bytes]:
        return [c.encode("utf-8") for c in self.chars]

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"trustgen_tokenizer": "char", "chars": self.chars}, ensure_ascii=False)

    def to_hf_json(self) -> tuple[str, str]:
        # One word per character ("(?m)" is Oniguruma's dot-matches-newline).
        return (_hf_word_level(self._index, _HF_ONE_CHARACTER),
                f"the char tokenizer as a WordLevel tokenizer of {self.vocab_size} characters")

    @classmethod
    def from_hf_word_level(cls, data: dict[str, Any]) -> CharTokenizer:
        """The char tokenizer that `to_hf_json` wrote, read back."""
        vocab = data["model"].get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(c, str) and len(c) == 1 for c in vocab):
            raise TrustgenError("the tokenizer file holds a WordLevel tokenizer whose words are not "
                                "single characters; trustgen reads byte-level BPE tokenizers and "
                                "WordLevel ones of single characters.")
        tokenizer = cls("".join(vocab))
        if tokenizer._index != vocab:
            raise TrustgenError("the tokenizer file's character ids are not in code-point order "
                                "0, 1, 2, …, as trustgen's char tokenizer numbers them.")
        return tokenizer


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8: needs no training and can represent any text."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)]

    def to_json(self) -> str:
        return json.dumps({"trustgen_tokenizer": "byte"})

    def to_hf_json(self) -> tuple[str, str]:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        # A byte-level BPE without merges: each byte is its own token, numbered by its value.
        tok = HFTokenizer(models.BPE(vocab=_byte_level_alphabet(), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str(), "the byte tokenizer as a byte-level BPE without merges (256 tokens)"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte -> printable-character map, inverted (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


# Positions after a newline that sits between two non-space characters. GPT-2's pre-tokenizer
# never joins anything across such a point, so texts cut there encode to the same ids as whole.
# (A cut inside a run of whitespace would change ids: "\n\n" alone merges, "\n\nb" splits.)
_SAFE_CUTS = re.compile(r"(?<=\S\n)(?=\S)")


def last_safe_cut(text: str) -> int:
    """The last position where `text` can be cut without changing any tokenizer's ids; 0 if none."""
    end = len(text) - 1
    while (newline := text.rfind("\n", 0, end)) > 0:
        if not text[newline - 1].isspace() and not text[newline + 1].isspace():
            return newline + 1
        end = newline
    return 0


class BPETokenizer(Tokenizer):
    """Byte-level BPE (as in GPT-2) backed by a Hugging Face `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        tok.train_from_iterator(chunks, trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TrustgenError(f"the tokenizer file is not a valid Hugging Face tokenizer: {exc}.") from None
        instance = cls(tok)
        instance.token_bytes  # noqa: B018 -- validate now: only byte-level vocabularies are supported
        return instance

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_array(self, text: str) -> np.ndarray:
        # Encoding pieces in a batch uses every core; the cuts keep the ids of the whole text.
        encoded = self.encode_batch(_SAFE_CUTS.split(text))
        return np.fromiter((i for ids in encoded for i in ids), dtype=np.int64)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        alphabet = _byte_level_alphabet()
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or any(ch not in alphabet for ch in piece):
                raise TrustgenError(
                    f"token {i} ({piece!r}) is not byte-level; only byte-level BPE tokenizers "
                    "(GPT-2 style) are supported.")
            table.append(bytes(alphabet[ch] for ch in piece))
        return table

    def to_json(self) -> str:
        return self._tok.to_str()

    def to_hf_json(self) -> tuple[str, str]:
        return self.to_json(), f"the byte-level BPE tokenizer as it is ({self.vocab_size} tokens)"


class MusicTokenizer(Tokenizer):
    """A fixed vocabulary of 132 tokens for four-voice scores on a 16th-note grid (DeepBach-style,
    Hadjeres et al. 2017): the 128 MIDI pitches (a note starts), `_` (the voice holds its note),
    `r` (the voice rests), a bar line and the boundary between pieces.

    The text of a score is its tokens' bytes joined: every time step is four voice tokens
    (soprano, alto, tenor, bass), each followed by a space, a bar line is `|` and a line break
    before the step that starts a bar, and pieces are separated by a blank line, which is the
    corpus's document separator. So a score is plain text, and everything that works on text
    (token files, sampling, watermarks) works on music unchanged.
    """

    kind = "music"
    PITCHES = 128
    HOLD, REST, BAR, END = 128, 129, 130, 131
    _TOKEN = re.compile(r"\d{1,3} |_ |r |\|\n|\n\n")

    @property
    def vocab_size(self) -> int:
        return 132

    @cached_property
    def token_bytes(self) -> list[bytes]:
        return [f"{p} ".encode() for p in range(self.PITCHES)] + [b"_ ", b"r ", b"|\n", b"\n\n"]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {piece.decode(): i for i, piece in enumerate(self.token_bytes)}

    def encode(self, text: str) -> list[int]:
        ids = self.encode_for_detection(text)
        if -1 in ids or sum(len(self.token_bytes[i]) for i in ids) != len(text.encode()):
            raise TrustgenError("the text is not a score in trustgen's music tokens (four voice tokens per "
                                "time step: a MIDI pitch, _ or r, each followed by a space).")
        return ids

    def encode_for_detection(self, text: str) -> list[int]:
        index = self._index
        return [index.get(piece, -1) for piece in self._TOKEN.findall(text)]

    def to_json(self) -> str:
        return json.dumps({"trustgen_tokenizer": "music", "grid": "16th", "voices": 4})

    def to_hf_json(self) -> tuple[str, str]:
        return (_hf_word_level(self._index, self._TOKEN.pattern),
                "the music tokenizer as a WordLevel tokenizer of its 132 tokens")


def train_tokenizer(kind: str, chunks: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Build a tokenizer of `kind` from the corpus chunks (`byte` ignores them)."""
    if kind == "char":
        return CharTokenizer.train(chunks)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(chunks, vocab_size)
    if kind == "music":
        return MusicTokenizer()
    raise TrustgenError(f"unknown tokenizer {kind!r}; choose char, byte, bpe or music.")


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrustgenError(f"the tokenizer file is not valid JSON ({exc.msg}).") from None
    if not isinstance(data, dict):
        raise TrustgenError("the tokenizer file does not hold a tokenizer.")
    kind = data.get("trustgen_tokenizer")
    if kind == "char" and isinstance(data.get("chars"), str):
        return CharTokenizer(data["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "music":
        return MusicTokenizer()
    model = data.get("model")
    if kind is None and isinstance(model, dict) and model.get("type") == "WordLevel":
        return CharTokenizer.from_hf_word_level(data)
    if kind is None and model is not None:
        return BPETokenizer.from_json(text)
    raise TrustgenError("the tokenizer file is of an unknown kind.")


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrustgenError(f"no tokenizer at {path}.") from None
    except UnicodeDecodeError:
        raise TrustgenError(f"the tokenizer file {path} is not UTF-8 text.") from None
    return tokenizer_from_json(text)

