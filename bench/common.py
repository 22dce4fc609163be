"""Helpers shared by the benchmark scripts: Markdown tables, timing, matmul rates, the model,
and the JSON record of each run (`Results`).

Not a benchmark itself. Every script imports it as `common` (Python puts the script's own
folder on `sys.path`), so `python bench/NAME.py` works from any directory.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trustgen.models.gpt import GPT, GPTConfig

# The model every benchmark measures (nanoGPT's Shakespeare-char configuration): 6 layers,
# 6 heads, 384 wide, 256 tokens of context, 65 characters.
FULL_MODEL = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "vocab_size": 65,
              "position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
# What `--quick` runs instead: small enough that a smoke test finishes in seconds.
QUICK_MODEL = {**FULL_MODEL, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}


def model_settings(quick: bool, **overrides: Any) -> dict[str, Any]:
    return {**(QUICK_MODEL if quick else FULL_MODEL), **overrides}


def build_gpt(settings: dict[str, Any], seed: int = 0) -> GPT:
    """A GPT with seeded random weights (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**settings))


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 N + 12 L C T.

    The estimate of the PaLM paper (Chowdhery et al. 2022, arXiv:2204.02311, appendix B), as
    nanoGPT's `estimate_mfu` uses it: 6 N for the forward and backward matrix products of the N
    weights a token passes through, 12 L C T for attention over a context of T. N leaves out
    the position embeddings (a lookup, not a product) but keeps the token embedding, which the
    tied output layer multiplies by.
    """
    config = model.config
    n = sum(p.numel() for p in model.parameters())
    if model.wpe is not None:
        n -= model.wpe.weight.numel()
    return 6 * n + 12 * config.n_layer * config.n_embd * config.block_size


# -- timing ---------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int = 2048,
                min_seconds: float = 2.0) -> float:
    """FLOP/s of a (size x size) @ (size x size) product in `dtype`, repeated for min_seconds.

    This is what the hardware delivers to the best-shaped matrix product through torch here;
    a model's FLOP/s divided by it is its model FLOPs utilisation (MFU).
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, oneDNN primitive creation
    synchronize(device)
    count, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and count >= 3:
            return 2 * size**3 * count / elapsed


# -- printing -------------------------------------------------------------------------------

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers are right-aligned, text left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    numeric = [all(_looks_numeric(row[i]) for row in cells) if cells else False
               for i in range(len(headers))]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(headers), line(rule), *(line(row) for row in cells)])


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("x", "").replace("%", "").strip()
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(markdown_table(headers, rows))
    print()


def cpu_model() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    """One line naming the machine and library versions a table was measured with."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
            f"({cpu_model()}), Python {platform.python_version()}")


# -- results on disk ------------------------------------------------------------------------

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Results:
    """The tables one benchmark run prints, written together to bench/results/NAME.json.

    NAME is the script's stem (plus `variant` where one script measures several things, e.g.
    `watermark-char`), and `-quick` is appended for a `--quick` run, so a smoke test never
    overwrites a full measurement. The file holds every table as rows of column name -> value
    (the values as printed), the command line, the date, the machine (CPU model, cores, torch)
    and the git commit it was measured at. This is the only place a benchmark writes JSON.
    """

    def __init__(self, script: str, quick: bool, variant: str | None = None) -> None:
        self.name = Path(script).stem + (f"-{variant}" if variant else "") + ("-quick" if quick else "")
        self.quick = quick
        self.command = shlex.join(["python", _relative(Path(script)), *sys.argv[1:]])
        self.started = time.time()
        self.tables: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Print a Markdown table (as `print_table` does) and keep it for the JSON file."""
        print_table(headers, rows)
        self.add(title, headers, rows)

    def add(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Keep a table the script printed its own way."""
        if len(set(headers)) != len(headers):
            raise ValueError(f"table {title!r} repeats a column name: {list(headers)}")
        self.tables.append({"title": title, "columns": list(headers),
                            "rows": [dict(zip(headers, row, strict=True)) for row in rows]})

    def note(self, line: str) -> None:
        """Print a line that belongs with the tables (a setting, a check) and keep it."""
        print(line)
        self.notes.append(line.strip())

    def write(self) -> Path:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        record = {
            "benchmark": self.name, "quick": self.quick, "command": self.command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - self.started, 1),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform()},
            "git": _git_state(),
            "tables": self.tables, "notes": self.notes,
        }
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results: {_relative(path)}")
        return path


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _git_state() -> dict[str, Any]:
    """The commit the benchmark ran at (`git rev-parse HEAD`) and whether the measured code (src/,
    bench/ but its results, pyproject.toml, constraints.txt) had uncommitted changes, in which case
    the commit alone does not say what was measured."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True,
                                  timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)src", ":(top)bench",
                 ":(top,exclude)bench/results", ":(top)pyproject.toml", ":(top)constraints.txt")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": None if status is None else bool(status)}


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes busy-looping on the CPU while the block runs: a loaded machine."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"
