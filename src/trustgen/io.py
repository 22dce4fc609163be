"""Storage: atomic writes, JSON, safetensors weights, multi-file checkpoints. What a run directory
means (its config, its format versions, the model it describes) is `trustgen.runs`' business.

A checkpoint is several files (weights, optimizer, trainer state) that must change together.
Each is first written beside its final name and fsynced; then a small journal naming them is
written atomically; then each file is renamed into place and the journal removed. A crash before
the journal leaves the old checkpoint; a crash after it is rolled forward by `recover`, so a
reader only ever sees one complete checkpoint. Nothing here unpickles: weights are safetensors,
everything else is JSON.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trustgen.errors import TrustgenError

JOURNAL = "checkpoint.journal"
LOCK = "run.lock"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(data: Any) -> bytes:
    """How JSON files are written: indented, keys sorted, a final newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json_bytes(data))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustgenError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TrustgenError(f"{path} is corrupt: it is not valid JSON.") from None


def commit_files(folder: Path, files: Mapping[str, bytes]) -> None:
    """Replace several files in `folder` as one atomic unit (see the module docstring)."""
    folder = Path(folder)
    for name, data in files.items():
        _write_synced(folder / (name + ".tmp"), data)
    _fsync_dir(folder)
    atomic_write_text(folder / JOURNAL, json.dumps(sorted(files)))
    recover(folder)


def recover(folder: Path) -> None:
    """Finish a checkpoint commit that a crash interrupted after its journal was written."""
    journal = Path(folder) / JOURNAL
    if not journal.exists():
        return
    for name in json.loads(journal.read_text()):
        tmp = journal.parent / (name + ".tmp")
        if tmp.exists():
            os.replace(tmp, journal.parent / name)
    _fsync_dir(journal.parent)
    journal.unlink()
    _fsync_dir(journal.parent)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (the OS lock of its run.lock file, which holds this
    process's id) or say which process holds it. The OS drops the lock when the process ends,
    however it ends, so a killed process never leaves a folder locked."""
    fd = os.open(Path(folder) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            raise TrustgenError(f"{folder} is in use by another trustgen process (PID {holder}); wait for it to "
                                "end or stop it first.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes; tensors sharing storage (tied weights) are stored once."""
    unique: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in tensors.items():
        # Only true aliases (same memory, same view) are stored once; empty tensors never are.
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous().cpu()
    return st_save(unique, metadata=metadata)


def tensors_from_bytes(data: bytes, source: Path | str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise TrustgenError(f"{source} is not a valid safetensors file ({exc}).") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TrustgenError(f"{path} does not exist.") from None
    return tensors_from_bytes(data, path)


def load_weights(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Load a state dict saved by `tensors_to_bytes`; tied aliases may be absent, nothing else."""
    expected = module.state_dict()
    aliases = set(expected) - {n for n, _ in module.named_parameters()} - {n for n, _ in module.named_buffers()}
    missing = set(expected) - set(tensors) - aliases
    unexpected = set(tensors) - set(expected)
    if missing or unexpected:
        detail = (f"missing {sorted(missing)[:5]}" if missing else f"unexpected {sorted(unexpected)[:5]}")
        raise TrustgenError(f"{source} does not match the model described by its config ({detail}).")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise TrustgenError(
                f"{source} does not match its config: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}.")
    module.load_state_dict(tensors, strict=False)


def weights_bytes(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    return tensors_to_bytes(model.state_dict(), metadata)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights as a safetensors file (no metadata)."""
    return hashlib.sha256(weights_bytes(model)).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed: a run's model id is that of its model.safetensors."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
