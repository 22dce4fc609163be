"""Image datasets: built-in digits, folders with classes and broken files, caching, splits."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trustgen.data.images import load_images, split_images
from trustgen.errors import TrustgenError


def test_mnist_is_5000_labelled_digits_split_4000_1000_stratified() -> None:
    data = load_images("mnist")
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [500] * 10 and data.classes == tuple("0123456789")
    assert data.images.max() == 255 and data.images.min() == 0
    split = split_images(data)
    assert len(split.train.labels) == 4000 and len(split.held_out.labels) == 1000
    assert np.bincount(split.held_out.labels).tolist() == [100] * 10
    # The split is fixed: the same images are held out every time.
    assert np.array_equal(split.held_out.images, split_images(load_images("mnist")).held_out.images)


def test_digits_are_scaled_to_the_full_byte_range() -> None:
    data = load_images("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.max() == 255
    resized = load_images("digits", image_size=16)
    assert resized.images.shape == (1797, 1, 16, 16)


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, color in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (root / name / "deeper").mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(np.array(color) + rng.integers(-20, 20, (40, 60, 3)), 0, 255).astype(np.uint8)
            target = root / name / ("deeper" if i == 2 else "") / f"{i}.{('png', 'jpg', 'webp')[i]}"
            Image.fromarray(pixels).save(target)
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def test_a_folder_with_class_subfolders_and_a_corrupt_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pets")
    data = load_images(str(folder), image_size=32)
    assert data.images.shape == (6, 3, 32, 32)
    assert data.classes == ("cats", "dogs") and sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.skipped == (str(Path("cats") / "broken.png"),)
    cat = data.images[data.labels == 0].mean(axis=(0, 2, 3))
    assert cat[0] > 150 and cat[2] < 80  # red stays red: channels are in RGB order


def test_folder_decoding_is_cached_by_content(tmp_path: Path) -> None:
    cache = Path(os.environ["TRUSTGEN_CACHE"]) / "images"

    def cached() -> set[Path]:
        return set(cache.glob("*.npz")) if cache.exists() else set()

    folder = make_folder(tmp_path / "pets")
    before = cached()
    first = load_images(str(folder), image_size=16)
    (entry,) = cached() - before
    written = entry.stat().st_mtime_ns
    again = load_images(str(folder), image_size=16)
    assert entry.stat().st_mtime_ns == written and cached() - before == {entry}
    assert np.array_equal(first.images, again.images) and again.classes == first.classes
    assert again.skipped == first.skipped
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(folder / "dogs" / "new.png")
    assert len(load_images(str(folder), image_size=16).labels) == len(first.labels) + 1


def test_grayscale_folder_without_classes(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((20, 30), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = load_images(str(tmp_path), image_size=8)
    assert data.images.shape == (3, 1, 8, 8) and data.classes == () and (data.labels == -1).all()


def test_bad_image_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="neither a folder"):
        load_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrustgenError, match="no PNG, JPEG or WebP"):
        load_images(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nope")
    with pytest.raises(TrustgenError, match="could be read"):
        load_images(str(tmp_path / "bad"))
