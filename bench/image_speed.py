"""Training speed of the image families on CPU: flush-denormal, bf16 autocast, channels-last,
and glibc keeping freed memory.

Times the training step `trustgen train` runs (`Trainer.step`: a GAN's discriminator and
generator updates with R1 and the moving average, or a VAE's ELBO step) on built-in `mnist`
with the default models, batch 64, in images per second:

- denormals: after a warm-up of real training, Adam's second moments and small weights hold
  subnormal floats, which x86 CPUs process very slowly unless they are flushed to zero;
- bf16 autocast against fp32;
- channels-last memory format against the default (NCHW);
- glibc's allocator keeping the memory a step frees (`keep_freed_memory`, which `Trainer.fit`
  calls on the CPU) against its default, which hands it back to the OS. Each is measured in a
  fresh process (a fresh heap, as `trustgen train` starts with; the setting cannot be undone),
  training with bf16 autocast and channels-last.

Ratios are against fp32, NCHW, flush on, measured in the same run.

    python bench/image_speed.py            # about 3 minutes on 2 cores
    python bench/image_speed.py --quick    # about a CPU-minute: only checks that it runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import Results, environment, fmt_rate, fmt_ratio, median, set_threads, time_call

from trustgen.api import train_config
from trustgen.models.registry import build_model, model_config
from trustgen.runtime import keep_freed_memory, resolve_device
from trustgen.training.data import image_training_data
from trustgen.training.trainer import Trainer


def make_trainer(family: str, precision: str, run_dir: Path, warmup_steps: int) -> Trainer:
    config = train_config({"max_steps": 10**6, "precision": precision}, family)
    data, _, size, channels = image_training_data(config)
    torch.manual_seed(0)
    model = build_model(family, model_config(family, {"image_size": size, "channels": channels}))
    trainer = Trainer(run_dir, config, model, data, resolve_device("cpu"))
    trainer.model.to(memory_format=torch.contiguous_format)  # the baseline layout; rows below change it
    for _ in range(warmup_steps):  # real training, so the weights and optimizer state are realistic
        trainer.step(0.0)
    return trainer


def images_per_second(trainer: Trainer, steps: int) -> float:
    times = time_call(lambda: trainer.step(0.0), torch.device("cpu"), repeats=steps)
    return trainer.config.batch_size / median(times)


def fresh_process_rate(family: str, allocator: str, quick: bool, threads: int | None) -> float:
    """Images per second of the default training step in a new process with glibc's allocator as given."""
    command = [sys.executable, __file__, "--allocator", allocator, "--family", family]
    command += ["--quick"] * quick + (["--threads", str(threads)] if threads else [])
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--allocator", choices=["default", "kept"], help=argparse.SUPPRESS)  # a fresh-process row
    parser.add_argument("--family", default="vae", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    warmup, steps = (3, 3) if args.quick else (300, 30)
    if args.allocator:
        if args.allocator == "kept":
            keep_freed_memory()
        torch.set_flush_denormal(True)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(args.family, "bf16", Path(tmp), warmup)
            trainer.model.to(memory_format=torch.channels_last)
            print(images_per_second(trainer, steps))
        return

    record = Results(__file__, args.quick)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("gan", "vae"):
            torch.set_flush_denormal(True)  # what Trainer.fit does on the CPU
            trainer = make_trainer(family, "fp32", Path(tmp) / family, warmup)
            baseline = images_per_second(trainer, steps)
            rows.append([family, "fp32, NCHW, flush denormals (baseline)", fmt_rate(baseline), fmt_ratio(1.0)])
            torch.set_flush_denormal(False)
            unflushed = images_per_second(trainer, steps)
            torch.set_flush_denormal(True)
            rows.append([family, "fp32, denormals not flushed", fmt_rate(unflushed), fmt_ratio(unflushed / baseline)])
            trainer.model.to(memory_format=torch.channels_last)
            channels_last = images_per_second(trainer, steps)
            rows.append([family, "fp32, channels-last", fmt_rate(channels_last), fmt_ratio(channels_last / baseline)])
            bf16 = make_trainer(family, "bf16", Path(tmp) / f"{family}-bf16", warmup)
            rate = images_per_second(bf16, steps)
            rows.append([family, "bf16 autocast, NCHW", fmt_rate(rate), fmt_ratio(rate / baseline)])
            bf16.model.to(memory_format=torch.channels_last)
            rate = images_per_second(bf16, steps)
            rows.append([family, "bf16 autocast, channels-last", fmt_rate(rate), fmt_ratio(rate / baseline)])
            for allocator, setting in (("default", "glibc's default allocator"),
                                       ("kept", "freed memory kept (trustgen's default here)")):
                rate = fresh_process_rate(family, allocator, args.quick, args.threads)
                rows.append([family, f"bf16 autocast, channels-last, new process, {setting}", fmt_rate(rate),
                             fmt_ratio(rate / baseline)])

    print(environment())
    print(f"Training images per second, median of {steps} steps after {warmup} warm-up steps (higher is better).\n")
    record.table("training images per second", ["family", "setting", "images/s", "vs baseline"], rows)
    record.write()


if __name__ == "__main__":
    main()
