"""Tokenizers: exact round trips on arbitrary Unicode, the numpy fast path, streaming decode,
JSON save/load, and clear errors for unknown characters and corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trustgen.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)
from trustgen.errors import TrustgenError

# A small mixed corpus: English verse with blank lines and indentation, Chinese, emoji and
# combining marks, so BPE learns merges across all of them (including "\n\n").
BPE_CORPUS = [
    "To be, or not to be, that is the question:\n\nWhether 'tis nobler in the mind to suffer\n",
    "床前明月光，疑是地上霜。\n\n举头望明月，低头思故乡。\n",
    "Café naïve résumé — e\u0301 a\u0308 😀🎉 👍🏽\n\n    indented line\n\n\n",
    "def f(x):\n    return x  # comment\n\n",
] * 8

CHAR_VOCAB = "abc XYZ\n\t.,!你好世界😀\u0301\u0308é"

few = settings(max_examples=60, deadline=None)
# Text that is valid and has no replacement character of its own, so any U+FFFD in a decoded
# piece could only come from a split character.
clean_chars = st.characters(codec="utf-8", exclude_characters="\ufffd")
clean_text = st.text(alphabet=clean_chars, max_size=120)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(BPE_CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer(CHAR_VOCAB)


@pytest.fixture(scope="module")
def tokenizers(bpe: BPETokenizer, char: CharTokenizer) -> dict[str, Tokenizer]:
    return {"char": char, "byte": ByteTokenizer(), "bpe": bpe}


def text_for(kind: str) -> st.SearchStrategy[str]:
    """Arbitrary text the tokenizer of `kind` can represent."""
    if kind == "char":
        return st.text(alphabet=CHAR_VOCAB, max_size=120)
    return st.text(max_size=120)


def stream_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# -- round trips ----------------------------------------------------------------------------

@few
@given(text=st.text(max_size=200))
@example(text="你好，世界 😀 e\u0301\n\n\r\n\x00\t")
def test_byte_round_trip_is_exact(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@few
@given(text=st.text(max_size=200))
@example(text="你好，世界 😀 e\u0301\n\n\r\n\x00\t")
@example(text="𝔘𝔫𝔦𝔠𝔬𝔡𝔢 never seen in training")
def test_bpe_round_trip_is_exact(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@few
@given(data=st.data())
def test_char_round_trip_is_exact_within_its_vocabulary(data: st.DataObject) -> None:
    corpus = data.draw(st.text(min_size=1, max_size=40), label="corpus")
    tok = CharTokenizer.train([corpus[: len(corpus) // 2], corpus[len(corpus) // 2:]])
    assert tok.vocab_size == len(set(corpus))
    text = data.draw(st.text(alphabet=sorted(set(corpus)), max_size=100), label="text")
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bpe_learns_merges_and_compresses(bpe: BPETokenizer) -> None:
    text = BPE_CORPUS[0]
    assert bpe.vocab_size > 256
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


# -- the numpy fast path --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@few
@given(data=st.data())
def test_encode_array_equals_encode(tokenizers: dict[str, Tokenizer], kind: str, data: st.DataObject) -> None:
    tok = tokenizers[kind]
    text = data.draw(text_for(kind), label="text")
    array = tok.encode_array(text)
    assert array.dtype == np.int64
    assert array.tolist() == tok.encode(text)


@few
@given(text=st.text(alphabet="ab \n\t你😀", max_size=40))
@example(text="a\n\nb")
@example(text="x \n\ny")
@example(text="床前明月光\n\n举头望明月")
def test_bpe_encode_array_equals_encode_around_whitespace(bpe: BPETokenizer, text: str) -> None:
    # encode_array cuts the text at newlines to encode in parallel; the corpus path must still
    # give exactly the ids that encode gives at sampling time.
    assert bpe.encode_array(text).tolist() == bpe.encode(text)


def test_encode_array_of_empty_text_is_empty(tokenizers: dict[str, Tokenizer]) -> None:
    for tok in tokenizers.values():
        assert tok.encode_array("").tolist() == []
        assert tok.encode("") == []


# -- streaming ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@few
@given(data=st.data())
def test_stream_decoder_pieces_join_to_decode(tokenizers: dict[str, Tokenizer], kind: str, data: st.DataObject) -> None:
    tok = tokenizers[kind]
    alphabet = CHAR_VOCAB if kind == "char" else clean_chars
    text = data.draw(st.text(alphabet=alphabet, max_size=120), label="text")
    ids = tok.encode(text)
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@few
@given(text=clean_text)
def test_byte_stream_emits_each_character_as_soon_as_it_is_complete(text: str) -> None:
    tok = ByteTokenizer()
    decoder = tok.stream_decoder()
    shown = ""
    for ch in text:
        for i in tok.encode(ch):
            shown += decoder.push(i)
        assert shown.endswith(ch)
    assert shown + decoder.flush() == text


@few
@given(ids=st.lists(st.integers(0, 255), max_size=60))
@example(ids=[0xE4, 0xB8, 0x41, 0xF0, 0x9F, 0x98, 0xFF, 0xC3])
def test_stream_decoder_matches_decode_on_invalid_utf8(ids: list[int]) -> None:
    tok = ByteTokenizer()
    assert "".join(stream_pieces(tok, ids)) == tok.decode(ids)


def test_stream_decoder_holds_back_a_split_character() -> None:
    tok = ByteTokenizer()
    decoder = tok.stream_decoder()
    first, second, third = "好".encode()
    assert decoder.push(first) == ""
    assert decoder.push(second) == ""
    assert decoder.push(third) == "好"
    assert decoder.flush() == ""


def test_stream_decoder_flush_replaces_an_unfinished_character() -> None:
    tok = ByteTokenizer()
    decoder = tok.stream_decoder()
    assert decoder.push("好".encode()[0]) == ""
    assert decoder.flush() == "\ufffd"


# -- save and load --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_json_round_trip_preserves_encodings(tokenizers: dict[str, Tokenizer], kind: str, data: st.DataObject) -> None:
    tok = tokenizers[kind]
    loaded = tokenizer_from_json(tok.to_json())
    text = data.draw(text_for(kind), label="text")
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_save_and_load_round_trip(tokenizers: dict[str, Tokenizer], kind: str, tmp_path: Path) -> None:
    tok = tokenizers[kind]
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.kind == tok.kind == kind
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.token_bytes == tok.token_bytes
    # The fingerprint keys the token cache: a reloaded tokenizer must find the same cache.
    assert loaded.fingerprint == tok.fingerprint
    sample = "abc 你好 😀\n" if kind != "char" else "abc 你好😀\n"
    assert loaded.encode(sample) == tok.encode(sample)


def test_bpe_file_is_a_plain_hugging_face_tokenizer(bpe: BPETokenizer, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    hf = HFTokenizer.from_file(str(path))
    text = "To be, or not to be 你好 😀"
    assert hf.encode(text, add_special_tokens=False).ids == bpe.encode(text)
    assert hf.decode(bpe.encode(text)) == text


def test_char_tokenizer_is_sorted_and_deduplicated() -> None:
    tok = CharTokenizer("cabbac\n")
    assert tok.chars == "\nabc"
    assert tok.encode("abc\n") == [1, 2, 3, 0]


def test_train_tokenizer_builds_each_kind() -> None:
    chunks = ["hello world\n", "你好\n"]
    assert isinstance(train_tokenizer("char", chunks), CharTokenizer)
    assert isinstance(train_tokenizer("byte", chunks), ByteTokenizer)
    bpe = train_tokenizer("bpe", chunks * 4, vocab_size=300)
    assert isinstance(bpe, BPETokenizer)
    assert bpe.decode(bpe.encode("hello 你好")) == "hello 你好"
    with pytest.raises(TrustgenError, match="wordpiece"):
        train_tokenizer("wordpiece", chunks)


# -- errors ---------------------------------------------------------------------------------

@few
@given(data=st.data())
def test_char_tokenizer_names_an_unseen_character(char: CharTokenizer, data: st.DataObject) -> None:
    known = data.draw(st.text(alphabet=CHAR_VOCAB, max_size=20), label="known")
    unseen = data.draw(st.characters(codec="utf-8").filter(lambda c: c not in CHAR_VOCAB), label="unseen")
    at = data.draw(st.integers(0, len(known)), label="at")
    text = known[:at] + unseen + known[at:]
    for encode in (char.encode, char.encode_array):
        with pytest.raises(TrustgenError) as info:
            encode(text)
        assert repr(unseen) in str(info.value)


def test_char_tokenizer_needs_a_corpus() -> None:
    with pytest.raises(TrustgenError):
        CharTokenizer("")
    with pytest.raises(TrustgenError):
        CharTokenizer.train([])


CORRUPT = [
    "",
    "not json at all",
    "[1, 2, 3]",
    "{\"trustgen_tokenizer\": \"char\"}",
    "{\"trustgen_tokenizer\": \"char\", \"chars\": \"\"}",
    "{\"trustgen_tokenizer\": \"char\", \"chars\": 5}",
    "{\"trustgen_tokenizer\": \"morse\"}",
    "{\"model\": {\"type\": \"BPE\", \"vocab\": 5}}",
    "{\"trustgen_tokenizer\": \"char\", \"chars\": \"ab\"",
]


@pytest.mark.parametrize("text", CORRUPT)
def test_corrupt_tokenizer_json_raises_trustgen_error(text: str) -> None:
    with pytest.raises(TrustgenError):
        tokenizer_from_json(text)


def test_truncated_bpe_file_raises_trustgen_error(bpe: BPETokenizer, tmp_path: Path) -> None:
    full = bpe.to_json()
    path = tmp_path / "tokenizer.json"
    path.write_text(full[: len(full) // 2], encoding="utf-8")
    with pytest.raises(TrustgenError):
        load_tokenizer(path)


def test_non_byte_level_hugging_face_tokenizer_is_rejected() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.WordLevel({"hello world": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert "model" in json.loads(hf.to_str())
    with pytest.raises(TrustgenError, match="byte-level"):
        tokenizer_from_json(hf.to_str())


def test_char_tokenizer_round_trips_through_its_hugging_face_form() -> None:
    from tokenizers import Tokenizer as HFTokenizer

    char = CharTokenizer("To be,\r\nor not 日本\t")
    text, note = char.to_hf_json()
    assert "WordLevel" in note
    sample = "be or\r\nnot\t日本 "
    assert HFTokenizer.from_str(text).encode(sample).ids == char.encode(sample)
    assert HFTokenizer.from_str(text).decode(char.encode(sample)) == sample
    assert tokenizer_from_json(text).to_json() == char.to_json()


def test_load_tokenizer_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="no tokenizer"):
        load_tokenizer(tmp_path / "absent.json")
    binary = tmp_path / "tokenizer.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TrustgenError):
        load_tokenizer(binary)


def test_music_tokenizer_exports_to_hugging_face_with_the_same_ids() -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from trustgen.data.tokenizers import MusicTokenizer

    music = MusicTokenizer()
    exported = HFTokenizer.from_str(music.to_hf_json()[0])
    score = "67 62 59 43 _ _ r 55 |\n_ 60 _ _ \n\n"
    assert exported.encode(score).ids == music.encode(score)
    assert exported.decode(exported.encode(score).ids) == score
