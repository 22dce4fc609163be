"""How small an image the spectral watermark can carry, and what it does not survive.

For each side length: the share of watermarked images the detector finds (p < 1e-3, corrected),
clean, over MNIST digits enlarged (or shrunk) to that side and photo crops shrunk to it, each
image with its own random key. This sets `MIN_SIDE` in trustgen.safety.watermark.image: below it
`trustgen generate` writes images unwatermarked and says so. A second table measures the two
edits the mark is not built for: a 60% centre crop and a 5-degree rotation.

    python bench/image_watermark_size.py            # about a minute on 2 cores
    python bench/image_watermark_size.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import secrets

import numpy as np
from common import Results, environment
from image_watermark import digits, photos

from trustgen.safety.watermark import edits
from trustgen.safety.watermark.image import ALPHA, MIN_SIDE, detect, embed

SIDES = (8, 16, 24, 28, 32, 40, 48, 52, 56, 64, 96, 128)
EDITS = {"crop 60% (centre)": edits.crop(0.6), "crop 60%, enlarged back": edits.crop(0.6, resize_back=True),
         "rotate 5°": edits.rotate(5), "crop 90% (centre), for comparison": edits.crop(0.9)}


def detected(images: list[np.ndarray], edit: edits.Edit = lambda image: image) -> float:
    """The share of images found after the edit, each marked with a fresh key."""
    found = []
    for image in images:
        key = secrets.token_bytes(32)
        found.append(detect(edit(embed(image, key)), {"k": key}).p_value < ALPHA)
    return float(np.mean(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=50, help="images per set and size")
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    count = 4 if args.quick else args.images
    print(environment())
    print(f"{count} images per cell, each with its own key; threshold p < {ALPHA:g} (corrected); "
          f"MIN_SIDE = {MIN_SIDE}\n")
    rows = [[side, f"{detected(digits(count, side)):.2f}", f"{detected(photos(count, side, seed=side)):.2f}"]
            for side in SIDES]
    record.table("share detected by side length (clean)", ["side (px)", "digits", "photos"], rows)
    sets = {"photos 64": photos(count, 64), "photos 128": photos(count, 128, seed=1), "digits 64": digits(count, 64)}
    rows = [[name, *(f"{detected(images, edit):.2f}" for edit in EDITS.values())] for name, images in sets.items()]
    record.table("share detected after edits it is not built for", ["set", *EDITS], rows)
    record.write()


if __name__ == "__main__":
    main()
