"""Where and how computation runs: the device, the precision, and process-wide CPU settings.

Low in the layers (beside config and storage), so the trainer, the evaluation code that trains
its own feature network, and the API that loads models all choose devices and precision the
same way.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from trustgen.errors import TrustgenError


def resolve_device(name: str) -> torch.device:
    """"auto" (a CUDA GPU, else Apple's MPS, else the CPU), or a device name such as cpu or cuda:1."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrustgenError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrustgenError("device cuda was asked for but no CUDA GPU is available.")
    return device


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 matrix products run natively: recent GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast for precision "bf16", or "auto" where `bf16_is_fast`; otherwise nothing."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_fast(device))
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch; images (4-D) go channels-last, the layout oneDNN's convolutions run fastest
    in (bench/image_speed.py)."""
    return tuple(t.to(device, non_blocking=True, memory_format=torch.channels_last) if t.dim() == 4
                 else t.to(device, non_blocking=True) for t in batch)


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU while training: once weights and Adam's second
    moments get small, subnormals can make x86 arithmetic several times slower. The flag is
    process-wide, so it is switched off again afterwards rather than left changing the
    numerics of the caller's other code."""
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_HEAP_TOP = 256 << 20  # freed memory at the top of the heap past this goes back to the OS
_LARGEST_HEAP_BLOCK = 32 << 20  # larger blocks are mapped on their own (glibc's own upper limit)


def keep_freed_memory() -> None:
    """Ask glibc's allocator to keep the memory a training step frees for the next step instead
    of handing it back to the OS and faulting it in again. With its default, adaptive thresholds,
    glibc trimmed the heap about 100 times a second during a VAE's training here: 90,000 page
    faults a second, and 400 training steps took 62.5 s instead of 51.9 s (bench/image_speed.py
    compares the two in fresh processes). The process keeps its peak heap afterwards, as the
    jemalloc and tcmalloc allocators that PyTorch's CPU tuning guide suggests do. Process-wide,
    and nothing happens off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_HEAP_TOP)
    libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK)


@contextmanager
def private_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block on torch's global random streams (model initialisation, dropout, noise)
    seeded with `seed` (None: continuing from the caller's state), and give the caller its own
    states back afterwards: what happens inside neither reads nor disturbs the caller's seed.
    Forks the CPU stream and, where there is CUDA, every GPU's."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextmanager
def one_native_thread() -> Iterator[None]:
    """Run a block with every BLAS and OpenMP thread pool in the process (scikit-learn's and
    scipy's, which vendor their own OpenMP and OpenBLAS, and torch's) limited to one thread.

    For the numerical fitting around a model (clustering, calibration) on a shared machine: a
    second OpenMP runtime beside torch's starts its own pool of one thread per core, and on a
    loaded 2-core machine those pools and torch's spin-waited for each other (measured in
    bench/gan_clustering_threads.py and docs/benchmarks.md). The work here is small
    matrices, where threads bought little even on an idle machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


__all__ = ["autocast_context", "bf16_is_fast", "flush_denormals", "keep_freed_memory",
           "one_native_thread", "private_rng", "resolve_device", "to_device"]
