"""No image is announced as watermarked unless the detector finds the mark in it (issue 22, point 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trustgen.safety import trust
from trustgen.safety.trust import ImageTrust, Keys, detect_image, verify
from trustgen.safety.watermark import image as image_watermark


def _picture(side: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture (uint8 H, W, 3), textured enough to carry a mark when large."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((side // 4 + 2, side // 4 + 2, 3))
    big = np.kron(coarse, np.ones((4, 4, 1)))[:side, :side]
    return (np.clip(big * 0.7 + rng.random((side, side, 3)) * 0.3, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def images(tmp_path: Path) -> ImageTrust:
    return ImageTrust(Keys(tmp_path / "keys", announce=None), model_id="0" * 64, family="vae", watermark="spectral")


@pytest.mark.parametrize("side", [8, 28, image_watermark.MIN_SIDE - 1])
def test_an_image_too_small_for_the_mark_is_written_and_signed_as_not_watermarked(
        images: ImageTrust, tmp_path: Path, side: int) -> None:
    picture = _picture(side)
    written = images.save(picture, tmp_path / "small.png")
    assert written.watermark is None and written.note.startswith(f"not watermarked (image too small: {side}x{side}")
    report = verify(written.path, images.keys)
    assert report["status"] == "verified"
    assert report["claim"]["watermark"] is None and report["claim"]["watermark_note"] == written.note
    assert np.array_equal(images.watermarked(picture), picture)  # the pixels are left as they are


def test_a_large_enough_image_is_claimed_only_with_a_detectable_mark(images: ImageTrust, tmp_path: Path) -> None:
    written = images.save(_picture(64), tmp_path / "big.png")
    assert written.watermark == images.mark and written.note is None
    assert detect_image(written.path, images.keys.store()).verdict == "watermarked"
    claim = verify(written.path, images.keys)["claim"]
    assert claim["watermark"] == images.mark.to_dict() and "watermark_note" not in claim


def test_a_mark_the_detector_cannot_find_is_not_claimed(images: ImageTrust, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    missed = image_watermark.ImageDetection("no watermark found", 0.5, "k", 0.0, 100, "the image as given", 1)
    monkeypatch.setattr(trust.image_watermark, "detect", lambda pixels, keys: missed)
    picture = _picture(64)
    png, written = images.encoded(picture, "big.png")
    assert png.startswith(b"\x89PNG") and written.watermark is None and "did not find the mark" in written.note
    assert np.array_equal(images.watermarked(picture), picture)
