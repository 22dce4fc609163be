"""Does the demo find its own watermark? kgw's strength and context width on a trained model.

`trustgen demo` samples 400 characters at temperature 0.8 and top-p 0.95 from a character GPT
trained for five minutes: text of low entropy, where most characters are all but certain and a
green list can tilt few of them. For an existing run (`--run`), for each δ in `--deltas` and
each context width in `--widths`, this generates `--samples` such continuations of the demo's
prompt (rows of one batch, each different) and measures:

- TPR: the share detected at p < 0.01 after the correction `trustgen detect` applies for the
  schemes it tries (3) — alone (and the largest p-value), after the demo's edit (every eighth
  word replaced by "and"), and pasted into 3x as much held-out human text;
- the false-positive rate on `--chunks` 400-token chunks of the held-out plays (5 keys);
- the cost: the samples' negative log-likelihood per token under the unwatermarked model
  (nats; at δ = 0 it is the model's own).

    python bench/watermark_demo.py --run /tmp/run-char --deltas 2 3 4 --widths 2 4
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import Results, environment, set_threads

import trustgen
from trustgen.data.text import SHAKESPEARE_VALIDATION, shakespeare_documents
from trustgen.safety.trust import TEXT_WATERMARKS
from trustgen.safety.watermark.text import KGWWatermark, detect_windowed

PROMPT = "ROMEO:"  # the demo's


@torch.no_grad()
def nll(model, prompt: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prompt + continuation])
    logits = model.model.float()(ids[:, :-1])
    return F.cross_entropy(logits[0], ids[0, 1:], reduction="none")[len(prompt) - 1:].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--deltas", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4])
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    model = trustgen.load(args.run, precision="fp32")
    tokenizer, vocab = model.tokenizer, model.tokenizer.vocab_size
    record = Results(__file__, False, variant=f"{tokenizer.kind}-{Path(args.run).name}")
    print(environment())
    record.note(f"{tokenizer.kind} model {args.run}; {args.samples} samples of {args.tokens} tokens after "
                f"{PROMPT!r} at temperature 0.8, top-p 0.95; p corrected x{len(TEXT_WATERMARKS)}.\n")
    plays = "\n\n".join(d.read() for d in shakespeare_documents() if d.name in SHAKESPEARE_VALIDATION)
    human = tokenizer.encode_for_detection(plays)
    starts = np.linspace(0, len(human) - 4 * args.tokens - 1, max(args.chunks, args.samples)).astype(int)
    prompt_ids = tokenizer.encode(PROMPT)
    correction = len(TEXT_WATERMARKS)
    rows = []
    for width in args.widths:
        fpr = [KGWWatermark(secrets.token_bytes(32), vocab, context_width=width).detect(
            human[s: s + args.tokens]).p_value * correction < 0.01 for _ in range(5) for s in starts[: args.chunks]]
        for delta in args.deltas:
            mark = KGWWatermark(secrets.token_bytes(32), vocab, delta=delta, context_width=width)
            texts = model.generate(PROMPT, n=args.samples, seed=1, max_new_tokens=args.tokens, temperature=0.8,
                                   top_p=0.95, processors=[mark])
            ids = [tokenizer.encode_for_detection(t) for t in texts]
            found = [mark.detect(i) for i in ids]
            alone = np.mean([f.p_value * correction < 0.01 for f in found])
            # The demo's edited copy: every eighth word of prompt + sample replaced by "and".
            edited = [" ".join("and" if k % 8 == 7 else w for k, w in enumerate((PROMPT + t).split(" ")))
                      for t in texts]
            after_edit = np.mean([mark.detect(tokenizer.encode_for_detection(e)).p_value * correction < 0.01
                                  for e in edited])
            pasted = []
            for k, i in enumerate(ids):
                filler = human[starts[k]: starts[k] + 3 * len(i)]
                mixed = filler[: len(filler) // 2] + i + filler[len(filler) // 2:]
                pasted.append(min(mark.detect(mixed).p_value, detect_windowed(mark, mixed).p_value) * correction < 0.01)
            cost = np.mean([nll(model, prompt_ids, tokenizer.encode(t)) for t in texts[:16]])
            worst = max(f.p_value for f in found) * correction
            rows.append([width, delta, f"{alone:.3f}", f"{worst:.1e}", f"{after_edit:.3f}", f"{np.mean(pasted):.3f}",
                         f"{np.median([f.scored for f in found]):.0f}", f"{np.mean(fpr):.4f}", f"{cost:.3f}"])
            print(rows[-1], flush=True)
    record.table(f"kgw on the demo's samples ({tokenizer.kind})",
                 ["context width", "delta", "TPR p<0.01", "worst p", "TPR after the demo's edit",
                  "TPR in 3x human", "median scored",
                  "FPR (400-token human chunks)", "NLL nats/token"], rows)
    record.write()


if __name__ == "__main__":
    main()
