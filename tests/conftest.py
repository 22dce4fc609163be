from pathlib import Path

import pytest
import torch

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token caches and keys go to a per-session temporary folder, never the user's home."""
    monkeypatch.setenv("TRUSTGEN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("TRUSTGEN_KEYSTORE", str(tmp_path_factory.getbasetemp() / "keystore"))
    torch.manual_seed(0)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of small plain-text documents."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        target = folder / ("sub" if i % 2 else "") / f"doc{i}.txt"
        target.write_text(TINY_TEXT * (8 + i), encoding="utf-8")
    return folder
