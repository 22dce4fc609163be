import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker holds one core: torch's own pool of one thread per core in every
    # worker would have the workers' threads spin-wait for each other.
    torch.set_num_threads(1)

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


def tiny_corpus(folder: Path) -> Path:
    """Four documents of TINY_TEXT, for models that should learn it in a few steps."""
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"d{i}.txt").write_text(TINY_TEXT * 10)
    return folder


# Trained once per session through the real CLI and shared by the CLI test modules.

@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT trained on TINY_TEXT."""
    from tests.test_cli import TINY, trustgen

    root = tmp_path_factory.mktemp("cli")
    result = trustgen("train", "--data", str(tiny_corpus(root / "data")), "--out", str(root / "run"), "--max-steps",
                      "8", *TINY)
    assert result.returncode == 0, result.stderr
    assert "validation loss" in result.stdout
    return root / "run"


@pytest.fixture(scope="session")
def cvae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional VAE trained on the built-in 8x8 digits."""
    from tests.test_cli import trustgen

    out = tmp_path_factory.mktemp("cli-images") / "cvae"
    result = trustgen("train", "--model", "vae", "--conditional", "--out", str(out), "--data", "digits",
                      "--max-steps", "6", "--batch-size", "16", "--latent-dim", "4", "--width", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "validation loss" in result.stdout
    return out


@pytest.fixture(scope="session")
def scores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of four chorales (MusicXML) and one file that is not a score."""
    import shutil

    from tests.test_music import corpus_chorales

    folder = tmp_path_factory.mktemp("scores")
    for path in corpus_chorales(4, held_out=False):
        shutil.copy(path, folder / path.name)
    (folder / "broken.mid").write_bytes(b"not a midi file")
    return folder


@pytest.fixture(scope="session")
def music_run(scores: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT trained three steps on `scores`, shared by the music, serve and browser tests."""
    from tests.test_cli import TINY, trustgen

    run = tmp_path_factory.mktemp("music") / "run"
    result = trustgen("train", "--data", str(scores), "--out", str(run), "--max-steps", "3", "--val-fraction", "0.25",
                      *TINY)
    assert result.returncode == 0, result.stderr
    return run
