"""Everyday edits an image goes through after it leaves trustgen, for testing watermarks.

Each edit takes and returns a uint8 image (H, W, C) and is deterministic given its seed, so a
robustness table can be reproduced. They are what a re-upload does to a picture (JPEG, a
smaller copy, a crop, a filter), not attacks crafted against the scheme.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

Edit = Callable[[np.ndarray], np.ndarray]


def _picture(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _array(picture: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(picture.convert("L" if channels == 1 else "RGB"))
    return array[:, :, None] if channels == 1 else array


def jpeg(quality: int) -> Edit:
    def edit(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        _picture(image).save(buffer, "JPEG", quality=quality)
        return _array(Image.open(buffer), image.shape[2])
    return edit


def resize_and_back(factor: float, method: Image.Resampling = Image.Resampling.BILINEAR) -> Edit:
    def edit(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        small = _picture(image).resize((max(1, round(width * factor)), max(1, round(height * factor))), method)
        return _array(small.resize((width, height), method), image.shape[2])
    return edit


def resize(factor: float) -> Edit:
    def edit(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        return _array(_picture(image).resize(size, Image.Resampling.BICUBIC), image.shape[2])
    return edit


def crop(fraction: float, where: str = "centre", resize_back: bool = False) -> Edit:
    """Keep `fraction` of each side, at the centre or a corner; optionally enlarge it back."""
    def edit(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        kept_h, kept_w = round(height * fraction), round(width * fraction)
        top = {"centre": (height - kept_h) // 2, "top left": 0, "bottom right": height - kept_h}[where]
        left = {"centre": (width - kept_w) // 2, "top left": 0, "bottom right": width - kept_w}[where]
        kept = image[top: top + kept_h, left: left + kept_w]
        if not resize_back:
            return np.ascontiguousarray(kept)
        return _array(_picture(kept).resize((width, height), Image.Resampling.BICUBIC), image.shape[2])
    return edit


def gaussian_noise(sigma: float, seed: int = 0) -> Edit:
    """Add N(0, sigma) noise on a 0..1 scale, then round back to 8 bits."""
    def edit(image: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(seed).normal(0.0, sigma * 255, image.shape)
        return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)
    return edit


def brightness(factor: float) -> Edit:
    return lambda image: _array(ImageEnhance.Brightness(_picture(image)).enhance(factor), image.shape[2])


def contrast(factor: float) -> Edit:
    return lambda image: _array(ImageEnhance.Contrast(_picture(image)).enhance(factor), image.shape[2])


def blur(radius: float) -> Edit:
    return lambda image: _array(_picture(image).filter(ImageFilter.GaussianBlur(radius)), image.shape[2])


def greyscale(image: np.ndarray) -> np.ndarray:
    return _array(_picture(image).convert("L"), 1)


def rotate(degrees: float) -> Edit:
    def edit(image: np.ndarray) -> np.ndarray:
        turned = _picture(image).rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=0)
        return _array(turned, image.shape[2])
    return edit


# The edits the watermark is specified to survive, then others it meets in the wild.
REQUIRED: dict[str, Edit] = {
    "JPEG q75": jpeg(75),
    "resize to 50% and back": resize_and_back(0.5),
    "crop 90% (centre)": crop(0.9),
    "crop 90%, resized back": crop(0.9, resize_back=True),
    "noise σ=0.02": gaussian_noise(0.02),
}
OTHERS: dict[str, Edit] = {
    "JPEG q50": jpeg(50),
    "resize to 50% (kept small)": resize(0.5),
    "resize to 50% and back (bicubic)": resize_and_back(0.5, Image.Resampling.BICUBIC),
    "crop 80% (corner)": crop(0.8, "top left"),
    "brightness +20%": brightness(1.2),
    "contrast -20%": contrast(0.8),
    "blur radius 1": blur(1.0),
    "rotate 2°": rotate(2.0),
}


# Text: the Unicode tricks that change a text's tokens without changing what a reader sees,
# the attacks trustgen.safety.watermark.canonical undoes.
CYRILLIC_TWINS = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441"}  # а е о р с


def zero_width_every(text: str, n: int = 3) -> str:
    """A zero-width space after every n-th character."""
    return "".join(c + ("\u200b" if i % n == n - 1 else "") for i, c in enumerate(text))


def homoglyphs(text: str, count: int = 5) -> str:
    """The first `count` Latin a e o p c that follow a letter, swapped for their Cyrillic twins."""
    chars, swapped = list(text), 0
    for i, c in enumerate(chars):
        if swapped < count and c in CYRILLIC_TWINS and i > 0 and chars[i - 1].isalpha():
            chars[i], swapped = CYRILLIC_TWINS[c], swapped + 1
    return "".join(chars)


TEXT_ATTACKS: dict[str, Callable[[str], str]] = {
    "zero-width after every 3rd character": zero_width_every,
    "5 Cyrillic homoglyphs": homoglyphs,
    "both": lambda text: zero_width_every(homoglyphs(text)),
}
