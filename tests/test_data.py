"""Corpora: Markdown plays to text, finding and splitting documents, chunked reading, cached
token files and training windows."""

from __future__ import annotations

import itertools
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trustgen.data import text as text_module
from trustgen.data.text import (
    DOCUMENT_SEPARATOR,
    SHAKESPEARE_VALIDATION,
    Document,
    TokenWindows,
    find_documents,
    iter_text,
    markdown_play_to_text,
    shakespeare_documents,
    split_documents,
    tokenize_to_file,
)
from trustgen.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    last_safe_cut,
)
from trustgen.errors import TrustgenError

MIXED = "First line\nsecond — naïve\n床前明月光，疑是地上霜。\n😀🎉👍🏽 e\u0301\n" * 6


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def token_file(tmp_path: Path, tokens: np.ndarray) -> Path:
    path = tmp_path / f"tokens.{tokens.dtype.name}.bin"
    tokens.tofile(path)
    return path


# -- Markdown plays ----------------------------------------------------------------------------

def test_markdown_play_to_text() -> None:
    markdown = (
        "# Hamlet\n\n"
        "## ACT I\n\n"
        "### SCENE I. Elsinore. A platform before the castle.\n\n"
        "_Enter Ghost_\n\n"
        "**HAMLET**  \n"
        "To be, or not to be, that is the question:  \n"
        "Whether \\-- nobler in the mind\n\n\n\n"
        "**KING CLAUDIUS**\n"
        "O, my offence is _rank_, it smells to heaven.\n"
    )
    assert markdown_play_to_text(markdown) == (
        "Hamlet\n\n"
        "ACT I\n\n"
        "SCENE I. Elsinore. A platform before the castle.\n\n"
        "Enter Ghost\n\n"
        "HAMLET:\n"
        "To be, or not to be, that is the question:\n"
        "Whether -- nobler in the mind\n\n"
        "KING CLAUDIUS:\n"
        "O, my offence is rank, it smells to heaven.\n"
    )


@pytest.mark.parametrize(("markdown", "expected"), [
    ("**ROMEO**", "ROMEO:\n"),
    ("**First Citizen**  ", "First Citizen:\n"),
    ("_Exit PHILOSTRATE_", "Exit PHILOSTRATE\n"),
    ("_Exeunt_ all", "Exeunt all\n"),
    ("\\-- and \\*stars\\* \\[bracket\\]", "-- and *stars* [bracket]\n"),
    ("a \\_ b", "a _ b\n"),
    ("verse with trailing spaces  ", "verse with trailing spaces\n"),
    ("snake_case stays", "snake_case stays\n"),
])
def test_markdown_play_line_rules(markdown: str, expected: str) -> None:
    assert markdown_play_to_text(markdown) == expected


@pytest.fixture(scope="module")
def shakespeare() -> list[Document]:
    return shakespeare_documents()


def test_shakespeare_documents_are_clean_plain_text(shakespeare: list[Document]) -> None:
    assert len(shakespeare) == 38
    assert len({d.name for d in shakespeare}) == 38
    assert set(SHAKESPEARE_VALIDATION) <= {d.name for d in shakespeare}
    for doc in shakespeare:
        text = doc.read()
        assert doc.text is not None and text == doc.text
        assert len(text) > 10_000, doc.name
        assert "**" not in text, doc.name
        assert "#" not in text, doc.name
        assert not re.search(r"(?<!\w)_|_(?!\w)", text), doc.name
        assert not re.search(r"[ \t]+$", text, re.MULTILINE), doc.name
        assert "\n\n\n" not in text, doc.name
        assert text.endswith("\n") and not text.endswith("\n\n"), doc.name
    hamlet = next(d for d in shakespeare if d.name == "hamlet").text
    assert "HAMLET:" in hamlet
    assert "To be, or not to be" in hamlet


def test_shakespeare_split_is_fixed(shakespeare: list[Document]) -> None:
    for seed in (0, 1):
        split = split_documents("shakespeare", shakespeare, val_fraction=0.5, seed=seed)
        assert sorted(d.name for d in split.val) == sorted(SHAKESPEARE_VALIDATION)
        assert len(split.train) == 34
        assert not {d.name for d in split.train} & set(SHAKESPEARE_VALIDATION)


def test_find_documents_builtin(shakespeare: list[Document]) -> None:
    found = find_documents("shakespeare")
    assert [d.name for d in found] == [d.name for d in shakespeare]


# -- finding documents ---------------------------------------------------------------------------

def test_find_documents_file(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.log", "any suffix works for a single file\n")
    docs = find_documents(str(path))
    assert [d.path for d in docs] == [path]
    assert docs[0].read() == "any suffix works for a single file\n"


def test_find_documents_folder_is_recursive_and_keeps_text_files_only(tmp_path: Path) -> None:
    keep = [write(tmp_path / "a.txt", "a\n"), write(tmp_path / "deep" / "er" / "b.md", "b\n"),
            write(tmp_path / "C.TXT", "c\n")]
    write(tmp_path / "code.py", "print()\n")
    write(tmp_path / "data.bin", b"\x00\x01")
    write(tmp_path / "empty.txt", "")
    docs = find_documents(str(tmp_path))
    assert sorted(d.path for d in docs) == sorted(keep)
    assert len({d.name for d in docs}) == len(docs)


def test_find_documents_glob(tmp_path: Path) -> None:
    a = write(tmp_path / "one" / "a.txt", "a\n")
    b = write(tmp_path / "two" / "three" / "b.txt", "b\n")
    write(tmp_path / "two" / "c.md", "c\n")
    docs = find_documents(str(tmp_path / "**" / "*.txt"))
    assert sorted(d.path for d in docs) == sorted([a, b])


@pytest.mark.parametrize("make", ["missing", "empty-folder", "no-text-files", "empty-files", "glob-none"])
def test_find_documents_errors(tmp_path: Path, make: str) -> None:
    source = {
        "missing": lambda: tmp_path / "nowhere",
        "empty-folder": lambda: tmp_path,
        "no-text-files": lambda: write(tmp_path / "code.py", "x = 1\n").parent,
        "empty-files": lambda: write(tmp_path / "empty.txt", "").parent,
        "glob-none": lambda: tmp_path / "*.txt",
    }[make]()
    with pytest.raises(TrustgenError):
        find_documents(str(source))


# -- splitting -----------------------------------------------------------------------------------

def test_folder_split_is_by_document_and_seeded(corpus: Path) -> None:
    docs = find_documents(str(corpus))
    assert len(docs) == 6
    splits = {seed: split_documents(str(corpus), docs, val_fraction=0.2, seed=seed) for seed in range(6)}
    for seed, split in splits.items():
        again = split_documents(str(corpus), docs, val_fraction=0.2, seed=seed)
        assert [d.name for d in again.val] == [d.name for d in split.val]
        assert split.train and split.val
        names = [d.name for d in split.train + split.val]
        assert sorted(names) == sorted(d.name for d in docs)
        total = sum(d.size for d in docs)
        held = sum(d.size for d in split.val)
        assert held >= 0.2 * total
        # Documents are taken until the fraction is reached, so the last one taken (no larger
        # than the largest) was still needed.
        assert held - max(d.size for d in split.val) < 0.2 * total
    assert len({tuple(sorted(d.name for d in s.val)) for s in splits.values()}) > 1


def test_split_never_holds_out_every_document(tmp_path: Path) -> None:
    docs = [Document(name=f"d{i}", text="x\n" * 10) for i in range(3)]
    split = split_documents(str(tmp_path), docs, val_fraction=0.99, seed=0)
    assert len(split.train) == 1 and len(split.val) == 2


def test_single_file_is_split_at_a_line_boundary(tmp_path: Path) -> None:
    path = write(tmp_path / "one.txt", MIXED)
    docs = find_documents(str(path))
    split = split_documents(str(path), docs, val_fraction=0.25, seed=0)
    (train,), (val,) = split.train, split.val
    assert (train.path, val.path) == (path, path)
    assert train.start == 0 and train.end == val.start and val.end == path.stat().st_size
    assert train.read().endswith("\n")
    assert train.read() + val.read() == MIXED
    assert 0.2 < val.size / path.stat().st_size < 0.35


def test_single_text_document_is_split_at_a_line_boundary() -> None:
    doc = Document(name="mem", text=MIXED)
    split = split_documents("mem", [doc], val_fraction=0.25, seed=0)
    (train,), (val,) = split.train, split.val
    assert train.read().endswith("\n") and val.read()
    assert train.read() + val.read() == MIXED


def test_one_line_file_is_split_at_a_sentence(tmp_path: Path) -> None:
    sentence = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. "
    text = sentence * (200_000 // len(sentence))  # a 200 KB file with no line break at all
    path = write(tmp_path / "one.txt", text)
    split = split_documents(str(path), find_documents(str(path)), val_fraction=0.1, seed=0)
    (train,), (val,) = split.train, split.val
    assert train.read().endswith("sleeps on. ") and val.read().startswith("The quick")
    assert train.read() + val.read() == text
    assert 0.08 < val.size / path.stat().st_size < 0.12


@pytest.mark.parametrize("newline", ["\r", "\r\n"])
def test_cr_line_endings_are_line_breaks(tmp_path: Path, newline: str) -> None:
    text = MIXED.replace("\n", newline)
    path = tmp_path / "old-mac.txt"
    path.write_bytes(text.encode("utf-8"))
    split = split_documents(str(path), find_documents(str(path)), val_fraction=0.25, seed=0)
    (train,), (val,) = split.train, split.val
    assert train.read().endswith(newline) and not val.read().startswith("\n")
    assert train.read() + val.read() == text
    assert 0.2 < val.size / path.stat().st_size < 0.35


def test_one_line_without_spaces_is_cut_between_characters() -> None:
    text = "日本語" * 40
    split = split_documents("mem", [Document(name="mem", text=text)], val_fraction=0.1, seed=0)
    (train,), (val,) = split.train, split.val
    assert train.read() + val.read() == text and val.read()


def test_a_single_character_is_too_short_to_split(tmp_path: Path) -> None:
    path = write(tmp_path / "one.txt", "x")
    with pytest.raises(TrustgenError, match="too short"):
        split_documents(str(path), find_documents(str(path)), val_fraction=0.1, seed=0)


# -- reading in chunks -------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=300),
       chunk_bytes=st.integers(1, 64))
@example(content="a\nbcd", chunk_bytes=4)  # one byte left after a chunk that ends mid-line
@example(content="好\n😀\n", chunk_bytes=2)
def test_chunks_join_to_the_exact_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       content: str, chunk_bytes: int) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "doc.txt"
    path.write_bytes(content.encode("utf-8"))
    chunks = list(Document(name="doc", path=path).chunks())
    assert "".join(chunks) == content
    assert all(chunks)
    for chunk, following in itertools.pairwise(chunks):
        # Cut at a newline between two non-space characters when the chunk has such a point.
        safe = chunk.endswith("\n") and len(chunk) > 1 and not chunk[-2].isspace() and not following[0].isspace()
        assert safe or last_safe_cut(chunk) == 0, (chunk, following)


def test_chunks_of_a_large_file_end_at_line_breaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 64)
    path = write(tmp_path / "big.txt", MIXED * 3)
    chunks = list(Document(name="big", path=path).chunks())
    assert len(chunks) > 10
    assert "".join(chunks) == MIXED * 3
    assert all(c.endswith("\n") for c in chunks)
    assert max(len(c.encode("utf-8")) for c in chunks) <= 64 + max(len(line.encode()) for line in MIXED.splitlines(True))


def test_byte_range_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 16)
    path = write(tmp_path / "one.txt", MIXED)
    split = split_documents(str(path), find_documents(str(path)), val_fraction=0.5, seed=0)
    assert "".join(iter_text(split.train + split.val)) == MIXED


@pytest.mark.parametrize("chunk_bytes", [4 << 20, 5])
def test_non_utf8_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", chunk_bytes)
    path = write(tmp_path / "latin1.txt", "café au lait\n".encode("latin-1") * 3)
    docs = find_documents(str(tmp_path))
    with pytest.raises(TrustgenError, match=re.escape(str(path))) as info:
        list(iter_text(docs))
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize("chunk_bytes", [4 << 20, 4])
def test_non_utf8_error_gives_the_offset_of_the_bad_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         chunk_bytes: int) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", chunk_bytes)
    # Byte 3 starts a two-byte character that byte 4 does not continue; with 4-byte chunks
    # the bad character straddles the chunk boundary.
    path = write(tmp_path / "bad.txt", b"abc\xc3(xyz\n")
    with pytest.raises(TrustgenError, match="offset 3\\)"):
        list(Document(name="bad", path=path).chunks())


def test_file_ending_in_a_cut_character_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 8)
    path = write(tmp_path / "cut.txt", "line\n好好".encode()[:-1])
    with pytest.raises(TrustgenError, match=re.escape(str(path))):
        list(Document(name="cut", path=path).chunks())


def test_binary_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(TrustgenError, match=re.escape(str(path))) as info:
        list(iter_text(find_documents(str(path))))
    assert "binary" in str(info.value)


# -- token files ---------------------------------------------------------------------------------

def read_tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.dtype(path.name.split(".")[-2]))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([MIXED, "First Citizen:\nSpeak, speak.\n\n"] * 4, vocab_size=320)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_token_file_decodes_to_the_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             bpe: BPETokenizer, kind: str) -> None:
    monkeypatch.setenv("TRUSTGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 64)
    write(tmp_path / "corpus" / "a.txt", "First Citizen:\nSpeak, speak.\n\nAll:\nResolved.\n")
    write(tmp_path / "corpus" / "b" / "mixed.md", MIXED)
    write(tmp_path / "corpus" / "c.txt", "no final newline, 末尾")
    docs = find_documents(str(tmp_path / "corpus"))
    tokenizer: Tokenizer = {"char": lambda: CharTokenizer.train(iter_text(docs)), "byte": ByteTokenizer,
                            "bpe": lambda: bpe}[kind]()
    path = tokenize_to_file(docs, tokenizer)
    assert path.parent == tmp_path / "cache" / "tokens"
    tokens = read_tokens(path)
    assert int(tokens.max()) < tokenizer.vocab_size
    assert tokenizer.decode(tokens.tolist()) == DOCUMENT_SEPARATOR.join(d.read() for d in docs)


def test_token_file_is_cached_by_content(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTGEN_CACHE", str(tmp_path / "cache"))
    tok = ByteTokenizer()
    docs = find_documents(str(corpus))
    seen: list[int] = []
    path = tokenize_to_file(docs, tok, progress=seen.append)
    assert sum(seen) == sum(d.size for d in docs)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    seen.clear()
    again = tokenize_to_file(find_documents(str(corpus)), tok, progress=seen.append)
    assert again == path
    assert path.stat().st_mtime_ns == 1_000_000_000  # not rewritten
    assert seen == []
    assert list((tmp_path / "cache" / "tokens").iterdir()) == [path]  # no temporary files left

    with open(corpus / "doc0.txt", "a", encoding="utf-8") as f:
        f.write("One more line.\n")
    changed = tokenize_to_file(find_documents(str(corpus)), tok)
    assert changed != path
    assert read_tokens(changed).size == read_tokens(path).size + len("One more line.\n")

    other_tokenizer = tokenize_to_file(docs, CharTokenizer.train(iter_text(docs)))
    assert other_tokenizer not in (path, changed)


# -- training windows ----------------------------------------------------------------------------

def test_token_windows_items(tmp_path: Path) -> None:
    windows = TokenWindows(token_file(tmp_path, np.arange(100, dtype=np.uint16)), block_size=8)
    assert len(windows) == 92
    for i in (0, 17, 91):
        x, y = windows[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(range(i, i + 8))
        assert y.tolist() == list(range(i + 1, i + 9))


def test_token_windows_batch_equals_stacked_items(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    windows = TokenWindows(token_file(tmp_path, rng.integers(0, 70_000, 500).astype(np.uint32)), block_size=16)
    starts = torch.tensor([0, 5, 483, 5, 200])
    x, y = windows.batch(starts)
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x, torch.stack([windows[int(s)][0] for s in starts]))
    assert torch.equal(y, torch.stack([windows[int(s)][1] for s in starts]))


def test_token_windows_sample_is_seeded(tmp_path: Path) -> None:
    windows = TokenWindows(token_file(tmp_path, np.arange(1000, dtype=np.uint16)), block_size=10)
    a = windows.sample(6, torch.Generator().manual_seed(3))
    b = windows.sample(6, torch.Generator().manual_seed(3))
    c = windows.sample(6, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (6, 10)
    assert torch.equal(a[1], a[0] + 1)


@pytest.mark.parametrize(("n_tokens", "block"), [(101, 10), (100, 10), (11, 10), (57, 4)])
def test_token_windows_sequential_covers_non_overlapping_windows(tmp_path: Path, n_tokens: int, block: int) -> None:
    windows = TokenWindows(token_file(tmp_path, np.arange(n_tokens, dtype=np.uint16)), block_size=block)
    batches = list(windows.sequential(batch_size=3))
    assert all(x.shape[0] <= 3 for x, _ in batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    # Every target after the first token is predicted exactly once, as far as whole windows go.
    assert len(x) == (n_tokens - 1) // block
    assert x.flatten().tolist() == list(range(len(x) * block))
    assert y.flatten().tolist() == list(range(1, len(x) * block + 1))


def test_token_windows_sequential_with_max_windows_takes_evenly_spaced_ones(tmp_path: Path) -> None:
    windows = TokenWindows(token_file(tmp_path, np.arange(1001, dtype=np.uint16)), block_size=10)
    every = torch.cat([x for x, _ in windows.sequential(batch_size=64)])
    assert len(every) == 100
    some = torch.cat([x for x, _ in windows.sequential(batch_size=4, max_windows=5)])
    starts = some[:, 0].tolist()
    assert len(starts) == 5
    assert starts[0] == 0 and starts[-1] == 990  # the first and the last window
    assert len(set(starts)) == 5 and all(s % 10 == 0 for s in starts)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) - min(gaps) <= 10
    few_windows = torch.cat([x for x, _ in windows.sequential(batch_size=64, max_windows=500)])
    assert torch.equal(few_windows, every)  # a limit above the count changes nothing


def test_token_windows_too_short(tmp_path: Path) -> None:
    path = token_file(tmp_path, np.arange(8, dtype=np.uint16))
    with pytest.raises(TrustgenError, match="block size"):
        TokenWindows(path, block_size=8)


def test_token_windows_pickle_without_the_open_file(tmp_path: Path) -> None:
    tokens = np.arange(200_000, dtype=np.uint32) % 65_000
    windows = TokenWindows(token_file(tmp_path, tokens.astype(np.uint16)), block_size=32)
    first = windows[1234]
    assert windows._fd is not None  # opened by the access above
    data = pickle.dumps(windows)
    assert len(data) < 2_000  # the 400 kB of tokens stay on disk
    clone = pickle.loads(data)
    assert clone._fd is None
    assert all(torch.equal(a, b) for a, b in zip(clone[1234], first, strict=True))
    assert windows._fd is not None  # pickling does not close the original


PII_TEXTS = [
    "mail bob@example.com or call +1 415 555 2671, card 4111 1111 1111 1111; ip 192.168.0.1",
    "::ffff:192.0.2.1 and 2001:db8::1 then GB82 WEST 1234 5698 7654 32 1234 and DE89370400440532013000",
    "415-555-2671 415-555-2671x 555-2671 (415) 555-2671 4111-1111-1111-1111-1111 bob@x.org@y.com",
    "In 1999-2004 the plant made 12345678 units at 3.5 per cent, v1.2.3, 10:30 on 2024-01-15.",
]


def test_pii_scrubbing_for_data_preparation_equals_the_policy_engines_redaction() -> None:
    """The detectors live in trustgen.data.pii (data preparation may not import safety); the
    content policy runs the same detectors through its streaming engine, and both agree."""
    from trustgen.data.pii import ALL_KINDS, find_pii, scrub_pii
    from trustgen.safety.policy import Policy, Rule

    redact = Policy([Rule(name="pii", action="redact", pii=ALL_KINDS)])
    for text in PII_TEXTS:
        result = redact.check(text)
        scrubbed, counts = scrub_pii(text)
        assert scrubbed == result.text, text
        assert [(m.kind, m.start, m.end) for m in find_pii(text)] == [(f.kind, f.start, f.end) for f in result.findings]
        assert sum(counts.values()) == len(result.findings)
    assert any(find_pii(text) for text in PII_TEXTS[:3]) and find_pii(PII_TEXTS[3]) == []
