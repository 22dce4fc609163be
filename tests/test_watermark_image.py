"""The image watermark on small fixtures: invisible (PSNR), found in its own images and nowhere
else, keyed, calibrated, and still found after the edits it is specified to survive."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from trustgen.data.images import mnist, split_images
from trustgen.errors import TrustgenError
from trustgen.safety.watermark import edits
from trustgen.safety.watermark.image import ALPHA, detect, embed

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def photos(count: int, size: int = 64) -> list[np.ndarray]:
    """RGB crops of scikit-learn's sample photographs, shrunk to size x size."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        source = load_sample_images().images[i % 2]
        side = int(rng.integers(size, 300))
        top, left = (int(rng.integers(0, n - side)) for n in source.shape[:2])
        crop = Image.fromarray(source[top: top + side, left: left + side]).resize((size, size), Image.Resampling.LANCZOS)
        out.append(np.asarray(crop))
    return out


def digits(count: int, size: int = 64) -> list[np.ndarray]:
    held_out = split_images(mnist()).held_out.images[:count]
    return [np.asarray(Image.fromarray(d[0]).resize((size, size), Image.Resampling.BICUBIC))[:, :, None]
            for d in held_out]


@pytest.fixture(scope="module")
def originals() -> list[np.ndarray]:
    return photos(12) + digits(8)


@pytest.fixture(scope="module")
def marked(originals: list[np.ndarray]) -> list[np.ndarray]:
    return [embed(image, KEY) for image in originals]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_the_watermark_costs_38_5_db_and_keeps_shape_dtype_and_alpha(originals: list[np.ndarray],
                                                                   marked: list[np.ndarray]) -> None:
    for image, watermarked in zip(originals, marked, strict=True):
        assert watermarked.shape == image.shape and watermarked.dtype == np.uint8
        assert 38.0 <= psnr(image, watermarked) <= 39.0
    rgba = np.dstack([originals[0], np.full((64, 64), 200, np.uint8)])
    marked_rgba = embed(rgba, KEY)
    assert np.array_equal(marked_rgba[:, :, 3], rgba[:, :, 3]) and psnr(rgba[:, :, :3], marked_rgba[:, :, :3]) >= 38.0
    grey_float = originals[-1][:, :, 0] / 255.0
    marked_float = embed(grey_float, KEY)
    assert marked_float.shape == (64, 64) and marked_float.dtype == np.float64
    assert detect(marked_float, {"k": KEY}).p_value < ALPHA


def test_found_in_its_own_images_and_not_in_originals_or_under_another_key(originals: list[np.ndarray],
                                                                            marked: list[np.ndarray]) -> None:
    for image, watermarked in zip(originals, marked, strict=True):
        found = detect(watermarked, {"mine": KEY})
        assert found.verdict == "watermarked" and found.key_id == "mine" and found.geometry == "the image as given"
        assert detect(image, {"mine": KEY}).verdict == "no watermark found"
        assert detect(watermarked, {"other": OTHER_KEY}).verdict == "no watermark found"
    both = detect(marked[0], {"other": OTHER_KEY, "mine": KEY})  # the key that fires names itself
    assert both.key_id == "mine" and both.keys_tried == 2


@pytest.mark.parametrize("name", list(edits.REQUIRED))
def test_survives_the_specified_edits(originals: list[np.ndarray], marked: list[np.ndarray], name: str) -> None:
    edit = edits.REQUIRED[name]
    for kind, images in (("photos", marked[:12]), ("enlarged digits", marked[12:])):
        found = [detect(edit(image), {"k": KEY}).p_value < ALPHA for image in images]
        assert np.mean(found) >= 0.85, f"{name}: found in {sum(found)} of {len(images)} {kind}"
    assert not any(detect(edit(image), {"k": KEY}).p_value < ALPHA for image in originals)


def test_found_after_a_crop_reports_the_crop(marked: list[np.ndarray]) -> None:
    found = detect(edits.crop(0.9)(marked[1]), {"k": KEY})
    assert found.verdict == "watermarked" and "90% crop (centre, kept at its size)" in found.geometry


@pytest.mark.slow
def test_p_values_are_calibrated_over_keys(originals: list[np.ndarray]) -> None:
    """For an unmarked image the carrier is a random direction, so p-values are uniform (the
    crop search only makes them conservative): about 5% fall below 0.05, never many more."""
    rng = np.random.default_rng(0)
    p = np.array([detect(originals[i % 4], {"k": rng.bytes(32)}).p_value for i in range(400)])
    assert 0.005 <= np.mean(p < 0.05) <= 0.08
    assert np.mean(p < ALPHA) <= 0.005


@pytest.mark.parametrize("bad", [np.zeros(10, np.uint8), np.zeros((4, 4), np.uint8), np.zeros((16, 16, 2), np.uint8)])
def test_bad_arrays_are_clear_errors(bad: np.ndarray) -> None:
    with pytest.raises(TrustgenError, match="expected an image"):
        embed(bad, KEY)
    with pytest.raises(TrustgenError, match="expected an image"):
        detect(bad, {"k": KEY})


def test_a_flat_image_is_never_called_watermarked() -> None:
    flat = np.full((64, 64), 128, np.uint8)
    assert detect(flat, {"k": KEY}).verdict == "no watermark found"
    with pytest.raises(TrustgenError, match="no watermark key"):
        detect(flat, {})


def test_reading_files_parses_pixels_only_and_keeps_deep_greys(marked: list[np.ndarray], tmp_path) -> None:
    from trustgen.safety.authenticity import read_image

    eps = tmp_path / "x.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert read_image(eps) is None  # PostScript is never handed to Ghostscript
    digit = marked[-1][:, :, 0]
    deep = tmp_path / "deep.png"
    Image.fromarray(digit.astype(np.uint16) * 257).save(deep)  # the same picture in 16-bit grey
    pixels = read_image(deep)
    assert pixels.shape == (64, 64, 1) and np.array_equal(pixels[:, :, 0], digit)
    assert detect(pixels, {"k": KEY}).verdict == "watermarked"
    huge = tmp_path / "huge.png"
    Image.new("L", (7000, 7000)).save(huge)
    with pytest.raises(TrustgenError, match="not tested"):
        read_image(huge)
