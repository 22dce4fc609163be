"""Quality and diversity of a text model's samples, each beside the same measure on human text.

Quality is the held-out likelihood: perplexity, bits per token and bits per character (the
last is comparable across tokenizers). Diversity is measured on words (runs of letters and
digits, and each punctuation mark alone), whatever the model's tokenizer, so a character
model and a BPE model are compared on the same units:

- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models", arXiv:1510.03055): distinct n-grams / all n-grams over every sample;
- self-BLEU (Zhu et al. 2018, "Texygen", arXiv:1802.01886): the BLEU-4 of each sample against
  all the others as references, averaged; 1 when every sample is the same, lower is more diverse;
- repetition within a sample (Welleck et al. 2019, "Neural Text Generation with Unlikelihood
  Training", arXiv:1908.04319, seq-rep-n): the share of a sample's n-grams that repeat an
  earlier n-gram of the same sample, averaged over samples;
- n-gram entropy (Zhang et al. 2018, "Generating Informative and Diverse Conversational
  Responses via Adversarial Information Maximization", arXiv:1809.05972, Ent-n): Shannon
  entropy in bits of the pooled n-gram distribution.

All of these depend on how many samples there are and how long they are, so the human
reference is always as many held-out chunks of the same lengths (`human_chunks`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustgen.errors import TrustgenError

_WORD = re.compile(r"\w+|[^\w\s]")
BLEU_N = 4
# Chen & Cherry 2014 ("A Systematic Comparison of Smoothing Techniques for Sentence-Level
# BLEU"), method 1: an n-gram order with no match counts epsilon matches instead of zero, so one
# empty order does not zero the geometric mean of a short sample.
BLEU_EPSILON = 0.1


def words(text: str) -> list[str]:
    """The units diversity is measured on: words and single punctuation marks."""
    return _WORD.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over the samples (0 when there are none)."""
    grams = [g for s in samples for g in ngrams(words(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: Sequence[str], n: int = 4) -> float:
    """Mean over samples (with at least one n-gram) of the share of n-grams already seen earlier
    in the same sample."""
    rates = []
    for sample in samples:
        grams = ngrams(words(sample), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def ngram_entropy(samples: Sequence[str], n: int) -> float:
    """Entropy in bits of the pooled n-gram distribution of the samples."""
    counts = Counter(g for s in samples for g in ngrams(words(s), n))
    total = sum(counts.values())
    if not total:
        return 0.0
    p = np.fromiter(counts.values(), dtype=np.float64) / total
    return float(-(p * np.log2(p)).sum())


def self_bleu(samples: Sequence[str], max_n: int = BLEU_N) -> float:
    """Mean BLEU-`max_n` of each sample against all the others (uniform weights, the closest
    reference length for the brevity penalty, Chen & Cherry method-1 smoothing).

    Clipped counts need, per hypothesis and n-gram, the largest count in any *other* sample:
    that is the overall largest count unless this sample alone holds it, in which case it is the
    second largest. Keeping the top two counts per n-gram makes the whole thing linear in the
    number of n-grams instead of quadratic in the number of samples.
    """
    if len(samples) < 2:
        raise TrustgenError("self-BLEU compares samples with each other; give at least two.")
    tokens = [words(s) for s in samples]
    lengths = np.array([len(t) for t in tokens])
    log_precisions = np.zeros((len(samples), max_n))
    for n in range(1, max_n + 1):
        counts = [Counter(ngrams(t, n)) for t in tokens]
        top: dict[tuple[str, ...], list[int]] = {}  # n-gram -> [largest, how many hold it, second]
        for c in counts:
            for gram, k in c.items():
                entry = top.setdefault(gram, [0, 0, 0])
                if k > entry[0]:
                    entry[:] = [k, 1, entry[0]]
                elif k == entry[0]:
                    entry[1] += 1
                elif k > entry[2]:
                    entry[2] = k
        for i, c in enumerate(counts):
            total = sum(c.values())
            if not total:
                log_precisions[i, n - 1] = math.log(BLEU_EPSILON)  # no n-grams at all: nothing matched
                continue
            clipped = 0
            for gram, k in c.items():
                best, holders, second = top[gram]
                others = best if (k < best or holders > 1) else second
                clipped += min(k, others)
            log_precisions[i, n - 1] = math.log((clipped or BLEU_EPSILON) / total)
    # Brevity penalty against the other sample whose length is closest (ties: the shorter).
    scores = np.empty(len(samples))
    for i, length in enumerate(lengths):
        others = np.delete(lengths, i)
        closest = others[np.lexsort((others, np.abs(others - length)))[0]]
        penalty = 1.0 if length > closest else math.exp(1 - closest / max(length, 1))
        scores[i] = penalty * math.exp(log_precisions[i].mean())
    return float(scores.mean())


def diversity(samples: Sequence[str]) -> dict[str, float]:
    """Every diversity measure of a set of texts, keyed as in the audit report."""
    result = {f"distinct_{n}": distinct_n(samples, n) for n in range(1, 5)}
    result["self_bleu"] = self_bleu(samples)
    result["repetition_rate"] = repetition_rate(samples, 4)
    result.update({f"entropy_{n}": ngram_entropy(samples, n) for n in range(1, 5)})
    result["mean_words"] = float(np.mean([len(words(s)) for s in samples]))
    return result


def human_chunks(texts: Sequence[str], lengths: Sequence[int], seed: int = 0) -> list[str]:
    """One chunk of human text per requested length (in characters), each starting at a line
    start chosen at random (seeded) in `texts`, so the reference sees the same amounts of text
    as the samples it is compared with."""
    joined = "\n".join(texts)
    need = max(lengths, default=0)
    starts = np.array([0] + [m.end() for m in re.finditer("\n", joined)])
    starts = starts[starts + need <= len(joined)]
    if not len(starts):
        raise TrustgenError(f"the held-out text ({len(joined):,} characters) is shorter than one sample "
                            f"({need} characters); generate shorter samples or hold out more text.")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(starts, size=len(lengths), replace=len(starts) < len(lengths))
    return [joined[s: s + n] for s, n in zip(chosen.tolist(), lengths, strict=True)]


# -- likelihood -------------------------------------------------------------------------------

def sequence_nll(model: nn.Module, sequences: Sequence[Sequence[int]], scored_from: int | Sequence[int] = 1,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token negative log-likelihood (nats) of each token sequence, and how many
    tokens were scored: tokens at positions >= scored_from (at least 1: the first token has
    nothing before it). Sequences may differ in length; one longer than the model's context is
    scored in windows that overlap by half a context, so every token sees at least that much."""
    limit = getattr(model, "context_limit", None)
    starts = [scored_from] * len(sequences) if isinstance(scored_from, int) else list(scored_from)
    pieces, owners, piece_starts = [], [], []
    for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        start = max(start, 1)
        if limit is None or len(seq) <= limit + 1:
            pieces.append(seq)
            owners.append(i)
            piece_starts.append(start)
            continue
        stride = max(limit // 2, 1)
        done = start  # tokens before this are scored (or not to be)
        while done < len(seq):
            first = max(0, min(done - stride, len(seq) - limit - 1)) if done > limit else 0
            end = min(first + limit + 1, len(seq))
            pieces.append(seq[first:end])
            owners.append(i)
            piece_starts.append(done - first)
            done = end
    nll, counts = _piece_nll(model, pieces, piece_starts, batch_size)
    totals = np.bincount(owners, weights=nll, minlength=len(sequences))
    scored = np.bincount(owners, weights=counts, minlength=len(sequences)).astype(np.int64)
    return totals, scored


@torch.no_grad()
def _piece_nll(model: nn.Module, sequences: Sequence[Sequence[int]], starts: Sequence[int],
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    device = next(model.parameters()).device
    totals = np.zeros(len(sequences))
    counts = np.zeros(len(sequences), dtype=np.int64)
    order = np.argsort([len(s) for s in sequences], kind="stable")  # similar lengths pad less
    for first in range(0, len(order), batch_size):
        rows = order[first: first + batch_size]
        width = max(len(sequences[r]) for r in rows)
        if width < 2:
            continue
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for j, r in enumerate(rows):
            seq = sequences[r]
            ids[j, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            scored[j, starts[r] - 1: len(seq) - 1] = True
        ids = ids.to(device)
        logits = model(ids[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(rows), -1)
        totals[rows] = (nll.cpu() * scored).sum(1).numpy()
        counts[rows] = scored.sum(1).numpy()
    return totals, counts


def heldout_quality(model: nn.Module, windows: Any, tokenizer: Any, max_tokens: int = 200_000,
                    batch_size: int = 32) -> dict[str, float]:
    """Perplexity, bits per token and bits per character of the held-out split.

    `windows` is the split's TokenWindows: non-overlapping windows of the model's context cover
    it (evenly spaced ones when it has more than `max_tokens`), as in the trainer's final
    evaluation. Characters are counted by decoding the scored tokens, so bits per character is
    the same measure for every tokenizer."""
    block = windows.block_size
    total_nll, tokens, chars = 0.0, 0, 0
    for x, y in windows.sequential(batch_size, max(1, max_tokens // block)):
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()
        nll, counts = sequence_nll(model, rows, batch_size=batch_size)
        total_nll += float(nll.sum())
        tokens += int(counts.sum())
        chars += sum(len(tokenizer.decode(r[1:])) for r in rows)
    if not tokens:
        raise TrustgenError("the held-out split has no tokens to score.")
    per_token = total_nll / tokens
    return {"perplexity": math.exp(per_token), "bits_per_token": per_token / math.log(2),
            "bits_per_char": total_nll / math.log(2) / max(chars, 1), "nats_per_token": per_token,
            "tokens": tokens, "chars": chars}


__all__ = ["distinct_n", "diversity", "heldout_quality", "human_chunks", "ngram_entropy", "repetition_rate",
           "self_bleu", "sequence_nll", "words"]
