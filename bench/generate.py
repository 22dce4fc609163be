"""Generation speed with the key/value cache, against Hugging Face transformers.

What it measures: tokens per second of greedy decoding, 256 new tokens after a short prompt,
at batch 1 and batch 8, for one GPT-2-shaped model (6 layers, 6 heads, 384 wide, learned
positions, LayerNorm, tanh-GELU = GPT-2's `gelu_new`; a 65-character vocabulary; random but
seeded weights) run three ways:

  (a) transformers: the model exported with `trustgen.hf.export_hf`, loaded with
      `GPT2LMHeadModel.from_pretrained`, decoded with `generate(do_sample=False, use_cache=True,
      min_new_tokens=max_new_tokens)` so that it never stops early;
  (b) trustgen, cached: `TextModel.generate(temperature=0)` on the run directory - end to end,
      from prompt text to text, through the incremental decoder and its preallocated cache;
  (c) trustgen, uncached: the same with `use_cache=False`, which recomputes the whole sequence
      at every step (the reference the cached path must equal);
  (d) trustgen, cached, bf16 weights: what `trustgen generate` does by default on a CPU that
      multiplies bf16 natively (`precision="auto"`);
  (e) trustgen, cached, int8 weights (`precision="int8"`: weight-only, per-channel scales).

Both libraries run in this one process with the same torch thread count; (a) to (c) in float32. The
context is 512 tokens (prompt + 256 new tokens must fit without trustgen's sliding window).
Every setup decodes once untimed (warm-up); then the setups take timed runs in turn and each
row reports its median. The `same tokens` column checks that trustgen's greedy tokens equal
transformers' for the same weights, and the line under the table gives the largest difference
between the two libraries' logits over one whole generated sequence. The random weights are drawn
10x larger than GPT-2's initialisation (std 0.2 instead of 0.02): at GPT-2's scale a random model
repeats one character forever, which would make the token check trivial, and its logits lie so
close together that float rounding could flip a greedy choice between two correct implementations.
The scale changes what is generated, not how fast.

    python bench/generate.py            # the full model: a few minutes on a laptop CPU
    python bench/generate.py --quick    # a tiny model, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import common
import torch

from trustgen import api, io, runs
from trustgen.data.tokenizers import CharTokenizer
from trustgen.hf import export_hf
from trustgen.runtime import resolve_device

# nanoGPT's Shakespeare-char vocabulary: exactly 65 characters.
VOCABULARY = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PROMPT_SOURCE = "First Citizen:\nBefore we proceed any further, hear me speak."
PROMPT_CHARS = 8
WEIGHT_SCALE = 10.0  # see the module docstring: varied greedy text, well-separated logits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens (smoke test)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per row (default 256; quick 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    parser.add_argument("--repeats", type=int, help="timed runs per setup (default 3; quick 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (32 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def prompts(batch_size: int) -> list[str]:
    """`batch_size` different prompts of PROMPT_CHARS characters each (no padding needed)."""
    starts = [(i * 7) % (len(PROMPT_SOURCE) - PROMPT_CHARS) for i in range(batch_size)]
    return [PROMPT_SOURCE[s: s + PROMPT_CHARS] for s in starts]


def write_run(run_dir: Path, settings: dict, tokenizer: CharTokenizer) -> None:
    """A run directory holding a seeded random GPT (what `trustgen train` would leave behind)."""
    model = common.build_gpt(settings, seed=0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(WEIGHT_SCALE)
    run_dir.mkdir(parents=True)
    tokenizer.save(run_dir / "tokenizer.json")
    io.atomic_write_bytes(run_dir / "model.safetensors", io.weights_bytes(model))
    runs.write_run_config(run_dir, "gpt", model.config, tokenizer.kind)


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def trustgen_generate(model: api.TextModel, texts: list[str], new_tokens: int,
                      use_cache: bool) -> list[list[int]]:
    outputs = model.generate(texts, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
    # A char tokenizer maps text back to exactly the tokens that made it.
    return [model.tokenizer.encode(text) for text in outputs]


def main() -> None:
    args = parse_args()
    record = common.Results(__file__, args.quick)
    common.set_threads(args.threads)
    device = resolve_device(args.device)
    from transformers import GPT2LMHeadModel
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    settings = common.model_settings(args.quick, mlp="gelu_tanh", block_size=64 if args.quick else 512)
    tokenizer = CharTokenizer(VOCABULARY)
    with tempfile.TemporaryDirectory(prefix="trustgen-bench-") as tmp:
        run_dir, hf_dir = Path(tmp) / "run", Path(tmp) / "hf"
        write_run(run_dir, settings, tokenizer)
        export_hf(run_dir, hf_dir)
        ours = api.load(run_dir, device=str(device), precision="fp32")
        ours_bf16 = api.load(run_dir, device=str(device), precision="bf16")
        ours_int8 = api.load(run_dir, device=str(device), precision="int8")
        theirs = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
        attention = theirs.config._attn_implementation

    print(f"# Generation speed ({'quick' if args.quick else 'full'})\n")
    print(f"{common.environment()}; device {device}; transformers {transformers_version} "
          f"(attention: {attention})\n")
    n_params = sum(p.numel() for p in ours.model.parameters())
    print(f"Model: {settings['n_layer']} layers, {settings['n_head']} heads, {settings['n_embd']} wide, "
          f"context {settings['block_size']}, vocabulary {settings['vocab_size']}, "
          f"{n_params / 1e6:.2f}M parameters; greedy, {args.new_tokens} new tokens after a "
          f"{PROMPT_CHARS}-token prompt; median of {args.repeats} timed run(s) after one warm-up.\n")

    headers = ["batch", "setup", "tokens/s", "vs transformers", "cached / uncached", "same tokens"]
    rows = []
    for batch_size in args.batch_sizes:
        texts = prompts(batch_size)
        ids = torch.tensor([tokenizer.encode(t) for t in texts], device=device)
        setups: dict[str, Callable[[], list[list[int]]]] = {
            "(a) transformers generate": lambda ids=ids: hf_generate(theirs, ids, args.new_tokens),
            "(b) trustgen, KV cache": lambda texts=texts: trustgen_generate(ours, texts, args.new_tokens, True),
            "(c) trustgen, no cache": lambda texts=texts: trustgen_generate(ours, texts, args.new_tokens, False),
            "(d) trustgen, KV cache, bf16": lambda texts=texts: trustgen_generate(ours_bf16, texts, args.new_tokens,
                                                                                 True),
            "(e) trustgen, KV cache, int8": lambda texts=texts: trustgen_generate(ours_int8, texts, args.new_tokens,
                                                                                 True),
        }
        tokens = {name: fn() for name, fn in setups.items()}  # warm-up, and the tokens to compare
        times: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(args.repeats):
            for name, fn in setups.items():
                times[name].extend(common.time_call(fn, device))
        rate = {name: batch_size * args.new_tokens / common.median(t) for name, t in times.items()}
        reference = tokens["(a) transformers generate"]
        cached, uncached = "(b) trustgen, KV cache", "(c) trustgen, no cache"
        for name in setups:
            same = "-" if name not in (cached, uncached) else ("yes" if tokens[name] == reference else
                                                              f"NO (first at {_first_difference(tokens[name], reference)})")
            rows.append([batch_size, name, common.fmt_rate(rate[name]),
                         common.fmt_ratio(rate[name] / rate["(a) transformers generate"]),
                         common.fmt_ratio(rate[cached] / rate[uncached]) if name == cached else "",
                         same])
        if batch_size == args.batch_sizes[0]:
            sequence = torch.cat([ids[:1], torch.tensor(reference[:1], device=device)], dim=1)
            logit_gap = max_logit_difference(ours.model, theirs, sequence)
    record.table("greedy decoding speed", headers, rows)
    record.note(f"Largest |logit difference| between trustgen and transformers over the first row's whole "
                f"sequence ({sequence.shape[1]} tokens, batch {args.batch_sizes[0]}): {logit_gap:.2e}")
    record.write()


@torch.no_grad()
def max_logit_difference(ours: torch.nn.Module, theirs: torch.nn.Module, ids: torch.Tensor) -> float:
    """Both models' logits for every position of `ids` (1, T), one full forward each."""
    return (ours(ids) - theirs(ids).logits).abs().max().item()


def _first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    """'row R, token T' of the first mismatch between two batches of token lists."""
    for r, (x, y) in enumerate(zip(a, b, strict=True)):
        for t, (i, j) in enumerate(zip(x, y, strict=False)):
            if i != j:
                return f"row {r}, token {t}"
        if len(x) != len(y):
            return f"row {r}, length {len(x)} vs {len(y)}"
    return "nowhere"


if __name__ == "__main__":
    main()
