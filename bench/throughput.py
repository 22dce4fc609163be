"""Training throughput of trustgen's GPT against a plain PyTorch loop.

What it measures: tokens per second and milliseconds per optimizer step while training a
6-layer, 6-head, 384-wide GPT at context 256 with batches of 64 windows over a 65-character
vocabulary (nanoGPT's Shakespeare-char model), three ways, on the same weights:

  (a) baseline: the same `GPT` module in float32 through a plain PyTorch loop - forward,
      `F.cross_entropy`, backward, `torch.optim.AdamW` with its default settings, `zero_grad`;
  (b) trustgen, fp32: `Trainer.step` as `trustgen train` runs it - windows sampled from a
      memory-mapped token file (`TokenWindows`), the learning-rate schedule, gradient clipping
      and the fused AdamW of `make_optimizer` - with `precision="fp32"`;
  (c) trustgen, bf16: the same with `precision="bf16"` (bf16 autocast, which `precision="auto"`
      chooses where `bf16_is_fast`).

(b) against (a) is the cost or gain of trustgen's loop at equal precision; (c) against (b) is
the effect of bf16 autocast. Batches are random tokens (the speed of a step does not depend on
the text). Each row first runs a few warm-up steps (allocator, oneDNN primitive creation); then
the rows take timed steps in turn (a, b, c, a, b, c, ...), so that a change in background load
hits every row alike, and the table reports each row's median step.

Model FLOPs utilisation (MFU) is the model's training FLOP/s - FLOPs per token from the PaLM
estimate 6 N + 12 L C T (see `common.flops_per_token`) times tokens per second - divided by the
rate of a large square matrix product measured in the same run, in the row's own precision and
against bf16 (the fastest this hardware offers). Absolute numbers vary from machine to machine;
the ratios against the baseline are what to compare.

    python bench/throughput.py            # the full model: a few minutes on a laptop CPU
    python bench/throughput.py --quick    # a tiny model, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F

from trustgen.config import TrainConfig
from trustgen.data.prepare import PreparedData
from trustgen.data.tokenizers import CharTokenizer
from trustgen.runtime import bf16_is_fast, resolve_device
from trustgen.training.data import text_training_data
from trustgen.training.trainer import Trainer

TOKEN_FILE_TOKENS = 1 << 21  # 4 MB of uint16 random tokens: many more windows than a run samples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default 64; quick 8)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 10; quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per row before timing (default 3; quick 2)")
    parser.add_argument("--matmul-size", type=int, help="side of the square matmul for the peak rate")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    quick = args.quick
    args.batch_size = args.batch_size or (8 if quick else 64)
    args.steps = args.steps or (5 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    if args.matmul_size is None:
        args.matmul_size = 256 if quick else (8192 if args.device.startswith("cuda") else 2048)
    return args


def baseline_step(model: torch.nn.Module, batch_size: int, device: torch.device) -> Callable[[], float]:
    """One step of the textbook loop: fp32, plain cross-entropy, AdamW with defaults."""
    optimizer = torch.optim.AdamW(model.parameters())
    generator = torch.Generator().manual_seed(0)
    config = model.config

    def step() -> float:
        model.train()
        block = torch.randint(config.vocab_size, (batch_size, config.block_size + 1), generator=generator)
        x, y = block[:, :-1].to(device), block[:, 1:].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trustgen_step(model: torch.nn.Module, batch_size: int, precision: str, device: torch.device,
                  token_file: Path, run_dir: Path) -> Callable[[], float]:
    """One `Trainer.step`, exactly as `trustgen train` runs it (nothing is written to run_dir)."""
    config = TrainConfig(batch_size=batch_size, max_steps=1000, precision=precision, device=str(device))
    tokenizer = CharTokenizer("".join(chr(32 + i) for i in range(model.config.vocab_size)))
    data = text_training_data(PreparedData(tokenizer, token_file, token_file), model.config.block_size)
    trainer = Trainer(run_dir, config, model, data, device)
    if not trainer.objective.optimizers["model"].defaults.get("fused"):
        print("note: make_optimizer fell back to the unfused AdamW on this device\n")
    return lambda: trainer.step(progress=0.0)["train_loss"]


def write_token_file(folder: Path, vocab_size: int) -> Path:
    # TokenWindows reads the dtype from the name: NAME.uint16.bin
    path = folder / "random.uint16.bin"
    rng = np.random.default_rng(0)
    rng.integers(0, vocab_size, TOKEN_FILE_TOKENS, dtype=np.uint16).tofile(path)
    return path


def measure(steps: list[Callable[[], float]], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Median seconds per step of each step function, timed in turn after `warmup` untimed steps."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, row_times in zip(steps, times, strict=True):
            row_times.extend(common.time_call(step, device))
    return [common.median(t) for t in times]


def main() -> None:
    args = parse_args()
    record = common.Results(__file__, args.quick)
    common.set_threads(args.threads)
    device = resolve_device(args.device)
    settings = common.model_settings(args.quick)
    tokens_per_step = args.batch_size * settings["block_size"]

    print(f"# Training throughput ({'quick' if args.quick else 'full'})\n")
    print(f"{common.environment()}; device {device}; bf16_is_fast: {bf16_is_fast(device)}\n")

    seconds = 0.5 if args.quick else 3.0
    rates = {"fp32": common.matmul_rate(torch.float32, device, args.matmul_size, seconds),
             "bf16": common.matmul_rate(torch.bfloat16, device, args.matmul_size, seconds)}
    record.note(f"Square matmul {args.matmul_size}x{args.matmul_size}: "
                f"fp32 {rates['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:,.0f} GFLOP/s "
                f"({rates['bf16'] / rates['fp32']:.1f}x)\n")

    with tempfile.TemporaryDirectory(prefix="trustgen-bench-") as tmp:
        token_file = write_token_file(Path(tmp), settings["vocab_size"])
        # Every row starts from the same weights (same seed).
        rows_spec = [
            ("(a) PyTorch loop, AdamW defaults (baseline)", "fp32",
             lambda model: baseline_step(model, args.batch_size, device)),
            ("(b) trustgen Trainer.step, fused AdamW", "fp32",
             lambda model: trustgen_step(model, args.batch_size, "fp32", device, token_file, Path(tmp))),
            ("(c) trustgen Trainer.step, fused AdamW", "bf16",
             lambda model: trustgen_step(model, args.batch_size, "bf16", device, token_file, Path(tmp))),
        ]
        models = [common.build_gpt(settings, seed=0).to(device) for _ in rows_spec]
        steps = [make_step(model) for (_, _, make_step), model in zip(rows_spec, models, strict=True)]
        seconds_per_step = measure(steps, args.warmup, args.steps, device)
    results = [(label, precision, s) for (label, precision, _), s in zip(rows_spec, seconds_per_step, strict=True)]
    flops = common.flops_per_token(models[0])
    n_params = sum(p.numel() for p in models[0].parameters())
    record.note(f"Model: {settings['n_layer']} layers, {settings['n_head']} heads, {settings['n_embd']} wide, "
                f"context {settings['block_size']}, vocabulary {settings['vocab_size']}, "
                f"{n_params / 1e6:.2f}M parameters; batch {args.batch_size} "
                f"({tokens_per_step:,} tokens per step); {flops / 1e6:.1f} MFLOPs per token (6N + 12LCT); "
                f"median of {args.steps} steps after {args.warmup} warm-up steps.\n")

    base_seconds = results[0][2]
    headers = ["setup", "precision", "ms/step", "tokens/s", "speed-up", "model GFLOP/s",
               "MFU (own precision)", "MFU (vs bf16 matmul)"]
    rows = []
    for label, precision, step_seconds in results:
        achieved = flops * tokens_per_step / step_seconds
        rows.append([label, precision, f"{step_seconds * 1e3:,.0f}", common.fmt_rate(tokens_per_step / step_seconds),
                     common.fmt_ratio(base_seconds / step_seconds), f"{achieved / 1e9:,.1f}",
                     f"{achieved / rates[precision]:.0%}", f"{achieved / rates['bf16']:.0%}"])
    record.table("training throughput", headers, rows)
    record.write()


if __name__ == "__main__":
    main()
