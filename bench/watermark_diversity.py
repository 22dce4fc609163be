"""Distortion-free watermarks: do samples still differ, and is the watermark still found?

For an existing run (`--run`, e.g. one made by `trustgen train`), and for each of: no
watermark, `kgw`, `synthid` (tournament sampling) and the retired `gumbel` (detection only
since synthid replaced it, generated here through its processor):

- diversity: `--samples` continuations of one prompt in one batch (rows of one seed), and the
  first sample of each of `--samples` seeds: distinct texts, and distinct-2 (word bigrams,
  pooled) relative to sampling without a watermark;
- power: `--samples` continuations of `--tokens` tokens from prompts cut out of the held-out
  plays, re-encoded from their text as a user's detector would: the share with p < 0.01, on its
  own and pasted into 3x as much held-out human text (windowed detection);
- false positives: `--chunks` chunks of `--tokens` tokens of the held-out plays under `--keys`
  keys: the share with p < 0.01 (nominal 0.01).

    python bench/watermark_diversity.py --run /tmp/run-char --temperature 1
    python bench/watermark_diversity.py --run /tmp/run-char --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import secrets

import numpy as np
from common import Results, environment, set_threads

import trustgen
from trustgen.data.text import SHAKESPEARE_VALIDATION, shakespeare_documents
from trustgen.evaluate.text import distinct_n
from trustgen.safety.watermark.text import DETECT_ONLY, SCHEMES, detect_windowed

SCHEMES_MEASURED = ["none", "kgw", "synthid", "gumbel"]


def build(scheme: str, vocab: int):
    return (SCHEMES.get(scheme) or DETECT_ONLY[scheme])(secrets.token_bytes(32), vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    model = trustgen.load(args.run, precision="fp32")
    tokenizer, vocab = model.tokenizer, model.tokenizer.vocab_size
    kind = "char" if vocab <= 512 else "bpe"
    record = Results(__file__, False, variant=f"{kind}-t{args.temperature}")
    print(environment())
    settings = {"max_new_tokens": args.tokens, "temperature": args.temperature,
                **({"top_p": args.top_p} if args.top_p else {})}
    record.note(f"{kind} model {args.run}, {args.tokens} tokens at temperature {args.temperature}"
                f"{f', top-p {args.top_p}' if args.top_p else ''}; {args.samples} samples.\n")
    plays = "\n\n".join(d.read() for d in shakespeare_documents() if d.name in SHAKESPEARE_VALIDATION)
    human = tokenizer.encode_for_detection(plays)
    starts = np.linspace(0, len(human) - 4 * args.tokens - 1, max(args.chunks, args.samples)).astype(int)
    prompts = [tokenizer.decode(human[s: s + 8]) for s in starts[: args.samples]]

    rows, baseline = [], {}
    for scheme in SCHEMES_MEASURED:
        mark = None if scheme == "none" else build(scheme, vocab)
        processors = [] if mark is None else [mark]
        batch = model.generate("ROMEO:", n=args.samples, seed=1, processors=processors, **settings)
        seeds = [model.generate("ROMEO:", seed=s, processors=processors, **settings)[0] for s in range(args.samples)]
        diversity = [distinct_n(batch, 2), distinct_n(seeds, 2)]
        baseline = baseline or dict(zip(("batch", "seeds"), diversity, strict=True))
        row = [scheme, f"{len(set(batch))} / {len(set(seeds))}",
               f"{diversity[0]:.3f} ({diversity[0] / baseline['batch']:.2f})",
               f"{diversity[1]:.3f} ({diversity[1] / baseline['seeds']:.2f})"]
        if mark is None:
            rows.append([*row, "", "", ""])
            continue
        texts = model.generate(prompts, seed=2, processors=processors, **settings)
        ids = [tokenizer.encode_for_detection(t) for t in texts]
        alone = np.mean([mark.detect(i).p_value < 0.01 for i in ids])
        pasted = []
        for k, i in enumerate(ids):
            filler = human[starts[k]: starts[k] + 3 * len(i)]
            pasted.append(detect_windowed(mark, filler[: len(filler) // 2] + i + filler[len(filler) // 2:],
                                          args.tokens).p_value < 0.01)
        fpr = [build(scheme, vocab).detect(human[s: s + args.tokens]).p_value < 0.01
               for _ in range(args.keys) for s in starts[: args.chunks]]
        rows.append([*row, f"{alone:.3f}", f"{np.mean(pasted):.3f}", f"{np.mean(fpr):.4f}"])
        print(rows[-1], flush=True)
    record.table(f"Diversity and detection ({kind}, T={args.temperature})",
                 ["scheme", "distinct texts (rows / seeds)", "distinct-2, rows (vs none)",
                  "distinct-2, seeds (vs none)", "TPR p<0.01", "TPR in 3x human", "FPR p<0.01"], rows)
    record.write()


if __name__ == "__main__":
    main()
