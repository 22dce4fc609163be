"""Peak memory (RSS) of `trustgen train` on a large text corpus.

What it measures: trustgen reads a corpus in chunks and tokenizes it once into a memory-mapped
token file, so its memory use should not grow with the corpus. This script writes a synthetic
corpus of `--gigabytes` (default 1 GB) - the lines of the built-in Shakespeare plays, shuffled
with a seeded RNG, chunk after chunk, never more than a few megabytes in memory - and runs

    python -m trustgen.cli train --data CORPUS --out RUN --max-steps N --quiet  (+ a small model)

in a child process with TRUSTGEN_CACHE in a temporary folder, sampling the resident set size
(RSS) of the child and all its descendants with psutil every 0.1 s. Files show which phase the
child is in: a `*.tmp` token file appears when encoding starts (before it: imports, the char
vocabulary scan over the whole corpus and the corpus hash), and the run's config.json appears
when training starts (after all data preparation). The baseline is the same command on a small
corpus (`--baseline-megabytes`) measured in the same run: a ratio near 1x means memory stays
flat as the corpus grows.

Columns: "peak RSS" is the largest sampled RSS; "excluding file pages" subtracts resident
file-backed pages (psutil's `shared`: the token file's memory map, shared libraries), which the
kernel can drop at any time, leaving the process's own heap; "kernel peak" is Linux's VmHWM, the
exact high-water mark of the main child process, which catches spikes between samples. The
validation share is trustgen's default (10%); the final evaluation reads at most 2M tokens of it.

    python bench/memory.py                 # 1 GB: several minutes, about 3 GB of temporary disk
    python bench/memory.py --quick         # 10 MB (smoke test): ~2 CPU-minutes, most of it the final evaluation
    python bench/memory.py --gigabytes 4 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import numpy as np
import psutil

from trustgen.data.text import shakespeare_documents

# A small model: memory here is about the data path, not the weights.
MODEL_FLAGS = ["--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "128",
               "--batch-size", "32"]
POLL_SECONDS = 0.1
MB = 1e6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 10 MB corpus and 5 steps (smoke test)")
    parser.add_argument("--gigabytes", type=float, help="corpus size (default 1.0; quick 0.01)")
    parser.add_argument("--baseline-megabytes", type=float, help="baseline corpus size (default 10; quick 1)")
    parser.add_argument("--max-steps", type=int, help="training steps (default 100; quick 5)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default 0.1)")
    parser.add_argument("--limit-gb", type=float, default=2.0, help="the memory bound to check (default 2)")
    parser.add_argument("--workdir", type=Path, help="where temporary files go (default: the system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus, token files and run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the line shuffle")
    args = parser.parse_args()
    args.gigabytes = args.gigabytes or (0.01 if args.quick else 1.0)
    args.baseline_megabytes = args.baseline_megabytes or (1.0 if args.quick else 10.0)
    args.max_steps = args.max_steps or (5 if args.quick else 100)
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_corpus(path: Path, n_bytes: int, seed: int) -> int:
    """Shuffled Shakespeare lines up to n_bytes (cut at a line end); returns the bytes written."""
    lines = np.array([line.encode("utf-8") for doc in shakespeare_documents()
                      for line in doc.text.splitlines(keepends=True) if line.strip()], dtype=object)
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "wb") as f:
        while written < n_bytes:
            block = b"".join(lines[rng.permutation(len(lines))])  # a few MB at a time
            if written + len(block) > n_bytes:
                block = block[: block.rfind(b"\n", 0, n_bytes - written) + 1] or block[: n_bytes - written]
            f.write(block)
            written += len(block)
    return written


@dataclass
class Phase:
    name: str
    started: float
    ended: float | None = None
    peak_rss: int = 0
    peak_private: int = 0


@dataclass
class Measurement:
    corpus_bytes: int
    phases: list[Phase] = field(default_factory=list)
    kernel_peak: int | None = None
    tokens: int = 0
    token_file_bytes: int = 0
    wall: float = 0.0

    @property
    def peak(self) -> int:
        return max([p.peak_rss for p in self.phases] + [self.kernel_peak or 0])

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(RSS, RSS without file-backed pages) summed over a process and its descendants."""
    rss = private = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            info = proc.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        private += info.rss - getattr(info, "shared", 0)
    return rss, private


def kernel_peak(pid: int) -> int | None:
    """VmHWM of a live process in bytes (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_training(corpus: Path, folder: Path, args: argparse.Namespace) -> Measurement:
    """Run `trustgen train` on `corpus` in a child process and sample its memory."""
    cache, run_dir = folder / "cache", folder / "run"
    command = [sys.executable, "-m", "trustgen.cli", "train", "--data", str(corpus), "--out", str(run_dir),
               "--max-steps", str(args.max_steps), "--eval-interval", str(args.max_steps),
               "--val-fraction", str(args.val_fraction), "--quiet", *MODEL_FLAGS]
    env = {**os.environ, "TRUSTGEN_CACHE": str(cache)}
    result = Measurement(corpus_bytes=corpus.stat().st_size)
    output = folder / "train.log"
    started = time.perf_counter()
    with open(output, "wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        process = psutil.Process(child.pid)
        phase = Phase("prepare", started)
        result.phases.append(phase)
        while child.poll() is None:
            now = time.perf_counter()
            if phase.name == "prepare" and any((cache / "tokens").glob("*.tmp")):
                phase = _next_phase(result, phase, "encode", now)
            if phase.name in ("prepare", "encode") and (run_dir / "config.json").exists():
                phase = _next_phase(result, phase, "train", now)
            try:
                rss, private = tree_memory(process)
            except psutil.NoSuchProcess:
                break
            phase.peak_rss = max(phase.peak_rss, rss)
            phase.peak_private = max(phase.peak_private, private)
            result.kernel_peak = kernel_peak(child.pid) or result.kernel_peak
            time.sleep(POLL_SECONDS)
        child.wait()
    phase.ended = time.perf_counter()
    result.wall = phase.ended - started
    if child.returncode != 0:
        log(output.read_text(encoding="utf-8", errors="replace")[-4000:])
        raise SystemExit(f"trustgen train failed with exit code {child.returncode}: {' '.join(command)}")
    state = json.loads((run_dir / "trainer_state.json").read_text())
    result.tokens = state["data"]["train_tokens"] + state["data"]["val_tokens"]
    result.token_file_bytes = sum(p.stat().st_size for p in (cache / "tokens").glob("*.bin"))
    return result


def _next_phase(result: Measurement, phase: Phase, name: str, now: float) -> Phase:
    phase.ended = now
    following = Phase(name, now)
    result.phases.append(following)
    return following


def duration(phase: Phase | None) -> float:
    return 0.0 if phase is None or phase.ended is None else phase.ended - phase.started


def mb(n_bytes: float) -> str:
    return f"{n_bytes / MB:,.0f}"


def main() -> None:
    args = parse_args()
    record = common.Results(__file__, args.quick)
    root = Path(tempfile.mkdtemp(prefix="trustgen-memory-", dir=args.workdir))
    try:
        results = {}
        for label, n_bytes in (("baseline", int(args.baseline_megabytes * 1e6)),
                               ("large", int(args.gigabytes * 1e9))):
            folder = root / label
            folder.mkdir()
            corpus = folder / "corpus.txt"
            log(f"writing a {n_bytes / 1e6:,.0f} MB corpus to {corpus} ...")
            write_corpus(corpus, n_bytes, args.seed)
            log(f"running trustgen train on it ({args.max_steps} steps) ...")
            results[label] = run_training(corpus, folder, args)
    finally:
        if args.keep:
            log(f"kept the temporary files in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"# Peak memory of trustgen train ({'quick' if args.quick else 'full'})\n")
    print(f"{common.environment()}; psutil {psutil.__version__}; model flags: {' '.join(MODEL_FLAGS)}; "
          f"{args.max_steps} steps; validation share {args.val_fraction}; RSS sampled every "
          f"{POLL_SECONDS} s over the child and its descendants; MB = 10^6 bytes.\n")
    timing_rows, memory_rows = [], []
    base = results["baseline"]
    for label, m in results.items():
        prepare, encode, train = m.phase("prepare"), m.phase("encode"), m.phase("train")
        timing_rows.append([label, mb(m.corpus_bytes), f"{m.tokens:,}", mb(m.token_file_bytes),
                            f"{duration(prepare):.1f}", f"{duration(encode):.1f}", f"{duration(train):.1f}",
                            f"{m.wall:.1f}"])
        memory_rows.append([
            label, *(mb(p.peak_rss) if p else "-" for p in (prepare, encode, train)), mb(m.peak),
            mb(max(p.peak_private for p in m.phases)), mb(m.kernel_peak) if m.kernel_peak else "n/a",
            common.fmt_ratio(m.peak / base.peak), f"{m.peak / m.corpus_bytes:.2f}",
            "yes" if m.peak < args.limit_gb * 1e9 else "NO"])
    record.table("corpus and time per phase", ["corpus", "corpus MB", "tokens", "token file MB", "prepare s",
                                                "encode s", "train s", "total s"], timing_rows)
    record.table("peak memory", ["corpus", "peak RSS MB: prepare", "encode", "train", "overall",
                                 "excluding file pages", "kernel peak", "vs baseline", "peak / corpus",
                                 f"under {args.limit_gb:g} GB"], memory_rows)
    record.note("prepare: start-up, char vocabulary scan and corpus hash; encode: writing the token file; "
                "train: steps, evaluation, checkpoint. Data preparation (prepare + encode) is the "
                "tokenize phase.")
    record.write()

if __name__ == "__main__":
    main()
