"""A keyed invisible watermark for small generated images, with an exact detection p-value.

Why this scheme. Generated images here start at 28x28, and the watermark must survive JPEG,
halving the resolution, cropping and noise at a PSNR of 38 dB or more. Block-based schemes
(DWT/DCT with quantisation, as in the `invisible-watermark` package) lose their blocks under
resizing and cropping and need large images. What survives all four edits is the image's
mid-frequency content as a whole: the global DCT coefficients between a few cycles per image and
about half of what the image can hold. Those frequencies outlive halving (it keeps the lower
half of the spectrum), JPEG (it quantises within 8x8 blocks, where they are the first few
coefficients) and additive noise (a correlation over hundreds of coefficients averages it away).

Embedding (spread spectrum, Cox et al. 1997, with a whitened detector). The key seeds a Gaussian
carrier w(u, v) over DCT frequencies; frequency (u, v) means u/2 by v/2 cycles per image at any
resolution, so the carrier is the same after resizing. The detector divides every coefficient by
the local spectrum level of the image it is given (its content and any noise an edit added,
never below the rounding noise of 8-bit pixels), so that the image's strong low frequencies do
not drown the watermark; the embedder therefore puts each coefficient's share of the watermark
in proportion to w / level, which spends the energy where the image is quiet. The pattern is scaled to a fixed PSNR and added to the luma (to R, G
and B in proportion to their luma weights, the least squared change for a given luma change; a
grey copy keeps the watermark).

Detection. On the image as given, and on a small set of crop hypotheses (a centred or corner
crop of 95..80% of each side, kept at its size or resized back; the missing border is filled by
reflection so the ordinary DCT applies), the statistic is the cosine between the whitened band
coefficients g and the carrier. For a carrier drawn independently of the image, the direction
of w is uniform on the sphere, so cos^2 follows Beta(1/2, (K-1)/2) exactly: the p-value is exact
for any image whatever its content. The hypotheses are combined by weighted Bonferroni (half of
the error budget for the image as given, the rest shared by the crops), and keys by Bonferroni.

The payload is the key id: a keystore holds a few keys, each detected separately, and the one
that fires names itself. A multi-bit payload would cost detection power this size cannot spare.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy.fft import dctn, idctn
from scipy.ndimage import uniform_filter
from scipy.special import betainc

from trustgen.errors import TrustgenError

SCHEME = "spectral"
# dB, of the watermarked image against the unmarked one. The embedder lands within 0.15 dB of
# it after clipping and rounding (38.45 at the least over 400 images), so every image stays at
# or above 38 dB, and the rest of the budget buys robustness: at 39 dB one key's 64-pixel
# photos fell to 0.89 after a 90% crop, at 38.5 dB to 0.93 (with the earlier noise floor, 0.02).
TARGET_PSNR = 38.5
BAND_LOW = 3.0  # DCT radius below which the image's own content dwarfs any watermark
BAND_HIGH_FRACTION = 0.6  # of the shorter side (the lower half of the band survives halving the image)
BAND_HIGH_MAX = 64  # larger images carry the watermark at the same frequencies as a 142-pixel one
# The least spectrum level a coefficient is given (pixel σ on a 0..1 scale; with the orthonormal
# DCT, per coefficient too): just above the rounding noise of 8-bit pixels, 1/255/√12 = 0.0011,
# so a frequency that holds nothing but rounding is not taken for signal. The level of any noise
# an edit adds is measured from the image itself, so the floor need not anticipate it; a floor
# of 0.02 (the σ of the noise edit) made the detector discount exactly the frequencies where a
# halved image keeps its watermark: enlarged digits after halving and back, 0.57 found at 0.02,
# 0.95 at 0.0045, 0.98 at 0.0015 (100 images, 5 keys).
NOISE_FLOOR = 0.002
SPECTRUM_WINDOW = 5  # neighbouring coefficients averaged to estimate the local spectrum level
MAX_ANALYSIS_SIDE = 256  # larger images are analysed at this size (the band fits well inside)
CROP_SCALES = (0.95, 0.9, 0.85, 0.8)  # crops the detector looks for, as a fraction of each side
AS_GIVEN_WEIGHT = 0.6  # shares of the false-positive budget: the image as given,
CENTRE_CROP_WEIGHT = 0.3  # centred crops,
CORNER_CROP_WEIGHT = 0.1  # and crops from a corner
BLURRED_WEIGHT = 0.1  # of which this much tests only the lower part of the band, up to
BLURRED_REACHES = (0.25, 0.35, 0.45)  # these fractions of the shorter side
ALPHA = 1e-3  # an image is called watermarked below this corrected p-value
# The shortest side that carries the mark: smaller images hold too few band frequencies for the
# cosine to clear the threshold. Share found clean (bench/image_watermark_size.py, 50 images,
# digits / photos): 28 px 0.00 / 0.52, 40 px 0.30 / 0.84, 48 px 0.86 / 0.96, 56 px 0.94 / 1.00,
# 64 px 1.00 / 1.00. Smaller images are written unwatermarked, and said to be; at or above it,
# each marked image is still checked (trustgen.safety.trust.ImageTrust) before it is claimed.
MIN_SIDE = 56
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ImageDetection:
    """The verdict on one image for one or more keys."""

    verdict: str  # "watermarked" or "no watermark found"
    p_value: float  # corrected for the crop hypotheses and the keys tried
    key_id: str  # the key that came closest
    cosine: float  # whitened band coefficients against the carrier, for the best hypothesis
    coefficients: int
    geometry: str  # the best hypothesis: "the image as given", or the crop or blur it assumed
    keys_tried: int

    def to_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "scheme": SCHEME, "key_id": self.key_id, "p_value": self.p_value,
                "cosine": self.cosine, "coefficients": self.coefficients, "geometry": self.geometry,
                "keys_tried": self.keys_tried}


@lru_cache(maxsize=16)
def _carrier_table(secret: bytes) -> np.ndarray:
    """The key's Gaussian carrier over DCT frequencies (u, v), u, v <= BAND_HIGH_MAX."""
    seed = hmac.new(secret, b"trustgen image watermark v1", hashlib.sha256).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    table = rng.standard_normal((BAND_HIGH_MAX + 1, BAND_HIGH_MAX + 1))
    table.flags.writeable = False
    return table


def _carrier(secret: bytes, shape: tuple[int, int]) -> np.ndarray:
    """The carrier laid over a DCT plane of this shape (zero beyond the band's reach)."""
    table = _carrier_table(secret)
    plane = np.zeros(shape)
    rows, columns = min(shape[0], table.shape[0]), min(shape[1], table.shape[1])
    plane[:rows, :columns] = table[:rows, :columns]
    return plane


@lru_cache(maxsize=64)
def _band(height: int, width: int, reach: float = BAND_HIGH_FRACTION) -> np.ndarray:
    """Which DCT coefficients of a (height, width) image carry the watermark (read-only: one
    detection asks for the same few shapes dozens of times)."""
    radius = np.hypot(*np.meshgrid(np.arange(height), np.arange(width), indexing="ij"))
    band = (radius >= BAND_LOW) & (radius <= min(BAND_HIGH_MAX, reach * min(height, width)))
    band.flags.writeable = False
    return band


def _spectrum_level(coefficients: np.ndarray) -> np.ndarray:
    """The image's local spectrum level at each coefficient, never below the noise floor."""
    local_power = uniform_filter(coefficients**2, size=SPECTRUM_WINDOW, mode="nearest")
    return np.sqrt(local_power + NOISE_FLOOR**2)


def _as_float(image: np.ndarray) -> np.ndarray:
    """uint8 or 0..1 float, (H, W) or (H, W, C) -> float64 (H, W, C) on a 0..1 scale."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 8:
        raise TrustgenError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with sides of "
                            f"at least 8 pixels, got {image.shape}.")
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    return image.astype(np.float64) / scale


def _luma(image: np.ndarray) -> np.ndarray:
    return image[:, :, 0] if image.shape[2] == 1 else image[:, :, :3] @ LUMA


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    if plane.shape == (height, width):
        return plane
    picture = Image.fromarray(plane.astype(np.float32), mode="F")
    return np.asarray(picture.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)


def _analysis_size(height: int, width: int) -> tuple[int, int]:
    shrink = min(1.0, MAX_ANALYSIS_SIDE / max(height, width))
    return max(8, round(height * shrink)), max(8, round(width * shrink))


def embed(image: np.ndarray, secret: bytes, psnr: float = TARGET_PSNR) -> np.ndarray:
    """The image with the key's watermark, at the given PSNR; same shape and dtype (uint8 or
    0..1 float). Works on (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) arrays (alpha is kept)."""
    original = np.asarray(image)
    pixels = _as_float(original)
    height, width = pixels.shape[:2]
    small = _analysis_size(height, width)
    coefficients = dctn(_resize(_luma(pixels), *small), norm="ortho")
    spread = np.where(_band(*small), _carrier(secret, small) / _spectrum_level(coefficients), 0.0)
    pattern = _resize(idctn(spread, norm="ortho"), height, width)[:, :, None]
    colour = slice(0, min(3, pixels.shape[2]))
    if pixels.shape[2] >= 3:  # the cheapest RGB change with this luma change (fewer squared errors)
        pattern = pattern * LUMA / (LUMA @ LUMA)
    target_mse = 10 ** (-psnr / 10)
    strength = np.sqrt(target_mse / np.mean(pattern**2))
    for _ in range(4):  # clipping at black and white loses some of the change: add it back
        marked = pixels.copy()
        marked[:, :, colour] = np.clip(pixels[:, :, colour] + strength * pattern, 0.0, 1.0)
        if original.dtype == np.uint8:
            marked = np.round(marked * 255) / 255
        mse = np.mean((marked[:, :, colour] - pixels[:, :, colour]) ** 2)
        if mse <= 0 or abs(mse / target_mse - 1) < 0.03:
            break
        strength *= min(np.sqrt(target_mse / mse), 4.0)
    if original.dtype == np.uint8:
        return (marked * 255).round().astype(np.uint8).reshape(original.shape)
    return marked.astype(original.dtype).reshape(original.shape)


def _hypotheses(height: int, width: int) -> list[tuple[str, tuple[int, int], tuple[int, int], tuple[int, int], float]]:
    """(description, frame size, size the image is resized to, its top-left corner in the frame,
    share of the false-positive budget)."""
    found = []
    for scale in CROP_SCALES:
        kept_size = ((round(height / scale), round(width / scale)), (height, width), "kept at its size")
        resized_back = ((height, width), (round(height * scale), round(width * scale)), "resized back")
        for frame, inner, how in (kept_size, resized_back):
            spare_h, spare_w = frame[0] - inner[0], frame[1] - inner[1]
            for where, corner in (("centre", (spare_h // 2, spare_w // 2)), ("top left", (0, 0)),
                                  ("top right", (0, spare_w)), ("bottom left", (spare_h, 0)),
                                  ("bottom right", (spare_h, spare_w))):
                weight = CENTRE_CROP_WEIGHT / (2 * len(CROP_SCALES)) if where == "centre" \
                    else CORNER_CROP_WEIGHT / (8 * len(CROP_SCALES))
                found.append((f"a {scale:.0%} crop ({where}, {how})", frame, inner, corner, weight))
    return found


def _cosine_p_value(cosine: float, dimensions: int) -> float:
    """P(cos >= c) for a direction uniform on the sphere in `dimensions` dimensions."""
    tail = 0.5 * float(betainc((dimensions - 1) / 2, 0.5, max(0.0, 1.0 - cosine * cosine)))
    return tail if cosine > 0 else 1.0 - tail


def detect(image: np.ndarray, keys: dict[str, bytes]) -> ImageDetection:
    """Test an image for the watermark of each key ({key id: secret}); the smallest corrected
    p-value wins."""
    if not keys:
        raise TrustgenError("there is no watermark key to test the image with; run: trustgen keys init")
    luma = _luma(_as_float(image))
    luma = _resize(luma, *_analysis_size(*luma.shape))
    height, width = luma.shape
    frames = []  # the whitened band coefficients under each hypothesis, shared by every key

    def add(description: str, coefficients: np.ndarray, band: np.ndarray, weight: float) -> None:
        whitened = (coefficients / _spectrum_level(coefficients))[band]
        length = np.linalg.norm(whitened)
        if length > 0:  # a flat image has nothing to test
            frames.append((description, band, whitened / length, weight))

    as_given = dctn(luma, norm="ortho")
    add("the image as given", as_given, _band(height, width), AS_GIVEN_WEIGHT - BLURRED_WEIGHT)
    for reach in BLURRED_REACHES:  # blurring or shrinking removed the top of the band
        add(f"the image blurred or shrunk (frequencies up to {reach:.0%} of the side)", as_given, _band(height, width, reach),
            BLURRED_WEIGHT / len(BLURRED_REACHES))
    crops = _hypotheses(height, width)
    for description, frame, inner, corner, weight in crops:
        placed = _resize(luma, *inner)
        pad = ((corner[0], frame[0] - inner[0] - corner[0]), (corner[1], frame[1] - inner[1] - corner[1]))
        add(description, dctn(np.pad(placed, pad, mode="symmetric"), norm="ortho"), _band(*frame), weight)
    best: tuple[float, str, float, int, str] | None = None
    for key_id, secret in keys.items():
        for description, band, unit, weight in frames:
            w = _carrier(secret, band.shape)[band]
            cosine = float(unit @ w / np.linalg.norm(w))
            p = min(1.0, _cosine_p_value(cosine, len(w)) / weight * len(keys))
            if best is None or p < best[0]:
                best = (p, key_id, cosine, len(w), description)
    if best is None:  # a flat image: no content at the watermark's frequencies
        return ImageDetection("no watermark found", 1.0, next(iter(keys)), 0.0, 0, "the image as given", len(keys))
    p, key_id, cosine, dimensions, geometry = best
    return ImageDetection("watermarked" if p < ALPHA else "no watermark found", p, key_id, cosine, dimensions,
                          geometry, len(keys))
