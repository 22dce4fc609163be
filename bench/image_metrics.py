"""Image metrics on mnist: the domain classifier, the floor, and the time to evaluate 5,000 samples.

What it measures:
  (1) the domain classifier that `trustgen.evaluate.images` trains on mnist's 4,000 training
      images: its accuracy on the 1,000 held-out images and its training time (`--retrain`
      trains it afresh in a temporary cache instead of loading the cached one);
  (2) `evaluate_samples` on stand-in samples: 5,000 images drawn with replacement from the
      training split, with Gaussian pixel noise of a few strengths (0 = copies of training
      images: perfect precision, but memorized). Each row gives the wall-clock time of the
      whole call with the classifier cached (features of the training split, the held-out
      split and the samples, then every metric for the three rows model / matched / floor),
      and the model's numbers beside the floor (held-out real images against the training split).

    python bench/image_metrics.py              # about a minute on 2 cores with the classifier cached
    python bench/image_metrics.py --retrain    # also trains the classifier (~20 s more)
    python bench/image_metrics.py --quick      # 1,000 samples, one noise level
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from common import Results, environment, set_threads

from trustgen.data.images import load_images, split_images
from trustgen.evaluate.images import evaluate_samples, load_domain_classifier

NOISE = (0, 16, 48)  # pixel noise std (0-255 scale)
TARGET_SECONDS = 30.0  # evaluate_samples on 5,000 28x28 samples, classifier cached, 2 cores


def stand_in_samples(images: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = images[rng.integers(0, len(images), n)].astype(np.float64)
    return np.clip(np.round(picked + rng.normal(0, noise, picked.shape)), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 samples, one noise level")
    parser.add_argument("--retrain", action="store_true", help="train the classifier in a temporary cache")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    record = Results(__file__, args.quick)
    set_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.retrain:
            os.environ["TRUSTGEN_CACHE"] = tmp  # cache_dir() reads it on every call
        split = split_images(load_images("mnist"))
        started = time.perf_counter()
        _, info = load_domain_classifier(split, progress=False)
        loaded_s = time.perf_counter() - started

        n = 1000 if args.quick else 5000
        rows, floor = [], None
        for noise in NOISE[1:2] if args.quick else NOISE:
            samples = stand_in_samples(split.train.images, n, noise)
            report = evaluate_samples(samples, split, progress=False)
            model, matched, floor = report["model"], report["matched"], report["floor"]
            seconds = report["seconds"]["total"]
            rows.append([f"train + noise σ={noise}", n, f"{seconds:.1f}", "yes" if seconds <= TARGET_SECONDS else "no",
                         f"{model['fid']:.2f}", f"{matched['fid']:.2f}", f"{report['fid_ratio']:.2f}",
                         f"{model['kid'] * 1000:.2f}", f"{model['precision']:.3f}", f"{model['recall']:.3f}",
                         f"{model['density']:.3f}", f"{model['coverage']:.3f}", f"{model['classes_covered']}/10"])

    print(environment())
    print("Domain classifier on mnist (4,000 training images, 1,000 held out).\n")
    record.table("domain classifier", ["kind", "held-out accuracy", "target", "train s", "this run"],
                 [[info["kind"], f"{info['held_out_accuracy']:.1%}", "≥ 98%", f"{info['train_seconds']:.1f}",
                   "loaded from cache" if info["cached"] else f"trained ({loaded_s:.1f} s)"]])
    print(f"evaluate_samples on stand-in samples (classifier cached; target ≤ {TARGET_SECONDS:.0f} s). "
          f"FID matched: the mean over disjoint sets of {floor['n']} samples, as many as the floor. KID x 1000.\n")
    record.table("evaluate_samples on stand-in samples",
                 ["samples", "n", "seconds", "met", "FID", "FID matched", "/ floor", "KID", "precision", "recall",
                  "density", "coverage", "classes"], rows)
    record.note(f"Floor (the {floor['n']} held-out images against the training split): FID {floor['fid']:.3f}, "
          f"KID x 1000 {floor['kid'] * 1000:.3f} ± {floor['kid_std'] * 1000:.3f}, precision {floor['precision']:.3f}, "
          f"recall {floor['recall']:.3f}, density {floor['density']:.3f}, coverage {floor['coverage']:.3f}, "
          f"classes {floor['classes_covered']}/10, class KL {floor['class_kl']:.4f}.")
    record.write()


if __name__ == "__main__":
    main()
