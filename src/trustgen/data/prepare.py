"""Preparing a text corpus for training: find, scrub, split, augment, insert canaries, tokenize.

`prepare_data` turns the data settings of a TrainConfig into token files (cached by content
hash) and the tokenizer that wrote them. Every step is a transform of the document list, in
this order: PII scrubbing (before the split, so no personal data reaches either side),
the split into training and held-out documents, the membership hold-out (random pieces of the
training documents, never trained on, that membership inference compares training windows
with), counterfactual augmentation of the training split, and the canary document (after the
split, so no secret lands in the held-out text).
Everything is drawn from the run's seed, so preparing the same settings again (resuming a run,
auditing it) rebuilds the same corpus.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustgen.config import TrainConfig
from trustgen.data.augment import augment_documents
from trustgen.data.canaries import CANARY_DOCUMENT, canary_record, canary_text, make_canaries
from trustgen.data.music import (
    chorale_text,
    find_chorales,
    is_music_source,
    split_chorales,
    transpositions,
)
from trustgen.data.text import (
    DOCUMENT_SEPARATOR,
    Document,
    Split,
    find_documents,
    hold_out_pieces,
    iter_text,
    scrub_documents,
    split_documents,
    tokenize_to_file,
)
from trustgen.data.tokenizers import MusicTokenizer, Tokenizer, train_tokenizer
from trustgen.progress import progress_bar

log = logging.getLogger("trustgen")


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Path
    val: Path
    summary: dict[str, Any] = field(default_factory=dict)
    split: Split | None = None  # the documents as trained on (scrubbed, with canaries): the audit reads them
    canaries: dict[str, Any] | None = None  # what canaries.json records, when the canaries setting inserted some
    # Tokens of the membership hold-out: pieces of the training documents never trained on (None: none held out).
    holdout: Path | None = None


def prepare_data(config: TrainConfig, tokenizer: Tokenizer | None = None, progress: bool = False) -> PreparedData:
    """Find, split and tokenize the corpus (training the tokenizer unless one is given)."""
    if is_music_source(config.data):
        return _prepare_music(config, progress)
    documents = find_documents(config.data)
    scrubbed: dict[str, int] | None = None
    if config.scrub_pii:
        documents, scrubbed = scrub_documents(documents)
        found = ", ".join(f"{n} {kind}" for kind, n in scrubbed.items()) or "nothing"
        log.info(f"scrubbed personal data from the corpus before training: {found}")
    split = split_documents(config.data, documents, config.val_fraction, config.seed)
    # Before augmentation, so that no swapped copy of a held-out piece is trained on.
    kept = hold_out_pieces(split.train, config.membership_holdout, config.seed)
    split, held = Split(kept.train, split.val), kept.val
    swapped: int | None = None
    if config.counterfactual_augment:
        # Every training document also appears with its gendered words swapped. Only the
        # training split: held-out text stays as written, so validation loss means the same
        # with and without it.
        train_docs, swapped = augment_documents(split.train, config.counterfactual_augment)
        documents = [*documents, *train_docs[len(split.train):]]
        split = Split(train_docs, split.val)
        log.info(f"counterfactual augmentation ({config.counterfactual_augment}): {swapped} words swapped "
                 f"in {len(train_docs) // 2} added copies of the training documents")
    canaries = None
    if config.canaries:
        # The secrets go into a training document of their own, after the split, so that none
        # lands in the held-out text; they are drawn from the run's seed, so resuming rebuilds
        # the same corpus. The char vocabulary below sees them too.
        inserted, controls = make_canaries(config.canaries, config.seed)
        canary_doc = Document(CANARY_DOCUMENT, text=canary_text(inserted, config.seed))
        split = Split([*split.train, canary_doc], split.val)
        documents = [*documents, canary_doc]
        canaries = canary_record(inserted, controls)
    if tokenizer is None:
        # The char vocabulary covers the whole corpus so validation text is always encodable;
        # BPE merges are learned from the training split alone.
        if config.tokenizer == "char":
            chunks = itertools.chain(iter_text(documents), [DOCUMENT_SEPARATOR])
        else:
            chunks = iter_text(split.train)
        tokenizer = train_tokenizer(config.tokenizer, chunks, config.vocab_size)
    prepared = _tokenize(config, split, tokenizer, progress, held)
    summary = prepared.summary
    summary["documents"] = len(documents)  # a one-document corpus is split in two pieces
    if scrubbed is not None:
        summary["pii_scrubbed"] = scrubbed
    if swapped is not None:
        summary["counterfactual_augment"] = {"axis": config.counterfactual_augment, "swapped_words": swapped}
    if canaries is not None:
        summary["canaries"] = len(canaries["inserted"])
    if held:
        summary["membership_holdout"] = {"fraction": config.membership_holdout, "pieces": len(held),
                                         "bytes": sum(d.size for d in held)}
    prepared.canaries = canaries
    return prepared


def _tokenize(config: TrainConfig, split: Split, tokenizer: Tokenizer, progress: bool,
              held: list[Document] | None = None) -> PreparedData:
    documents = [*split.train, *split.val, *(held or [])]
    total = sum(d.size for d in documents)
    bar = progress_bar(total, "tokenizing", unit="B", unit_scale=True) if progress else None
    update = bar.update if bar is not None else None
    train_path = tokenize_to_file(split.train, tokenizer, update)
    val_path = tokenize_to_file(split.val, tokenizer, update)
    holdout_path = tokenize_to_file(held, tokenizer, update) if held else None
    if bar is not None:
        bar.close()
    summary = {
        "source": config.data,
        "documents": len(documents),
        "train_documents": len(split.train),
        "val_documents": [d.name for d in split.val][:20],
        "bytes": total,
        "train_tokens": train_path.stat().st_size // _itemsize(train_path),
        "val_tokens": val_path.stat().st_size // _itemsize(val_path),
    }
    return PreparedData(tokenizer, train_path, val_path, summary, split, holdout=holdout_path)


def _prepare_music(config: TrainConfig, progress: bool) -> PreparedData:
    """Four-voice scores as music tokens: whole pieces held out, and the training pieces also
    in every other key that keeps the voices in their ranges (never the held-out ones, so the
    validation loss means the same with and without it)."""
    chorales = find_chorales(config.data, progress)
    train, val = split_chorales(config.data, chorales, config.val_fraction, config.seed)
    moved = transpositions(train)
    split = Split([Document(c.name, text=chorale_text(c)) for c in [*train, *moved]],
                  [Document(c.name, text=chorale_text(c)) for c in val])
    prepared = _tokenize(config, split, MusicTokenizer(), progress)
    prepared.summary["documents"] = len(chorales)
    prepared.summary["transposed_copies"] = len(moved)
    return prepared


def _itemsize(path: Path) -> int:
    return 2 if ".uint16." in path.name else 4


__all__ = ["PreparedData", "prepare_data"]
