"""The self-conditioned GAN on a loaded machine: native thread pools in the clustering against
torch's threads in the training step.

`trustgen train --model gan` clusters the training images before the first step (PCA, t-SNE
and k-means from scikit-learn, a Fisher discriminant from scipy). scikit-learn and scipy ship
their own OpenMP runtime and OpenBLAS beside torch's, each with a pool of one thread per core.
On a 2-core machine shared with other work, the default GAN trained at about 1/40 of the
images/s of `--clusters 0`. This script measures, each configuration in a fresh process (a
thread pool, once started, lives as long as the process) while `--load` busy processes spin
on the same cores:

- the seconds `fit_clusters` takes on built-in mnist, and
- the images/s of the GAN training step (`Trainer.step`) after it, median over steps,

for `--clusters 0` (no fitting: the reference), the clustering as it was (every pool at its
default size), the clustering inside `one_native_thread` (what trustgen does now), the old way
with `OMP_WAIT_POLICY=PASSIVE` (OpenMP threads sleep instead of spinning when idle), and torch
limited to one thread.

    python bench/gan_clustering_threads.py                # 5,000 images, about 10 minutes on 2 cores
    python bench/gan_clustering_threads.py --quick        # 1,000 images, a few steps: a smoke test
    taskset -c 0,1 python bench/gan_clustering_threads.py # a 2-core machine on a bigger one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    Results,
    busy_processes,
    environment,
    fmt_rate,
    fmt_ratio,
    median,
    set_threads,
    time_call,
)
from threads import gan_trainer

from trustgen.models import gan_fitting

# (label, clusters, clustering inside one_native_thread, extra environment, torch threads)
CONFIGURATIONS = (
    ("--clusters 0 (no clustering; reference)", 0, True, {}, None),
    ("clusters 20, pools at their defaults (before)", 20, False, {}, None),
    ("clusters 20, clustering in one_native_thread (now)", 20, True, {}, None),
    ("clusters 20, pools at defaults, OMP_WAIT_POLICY=PASSIVE", 20, False, {"OMP_WAIT_POLICY": "PASSIVE"}, None),
    ("clusters 20, one_native_thread, torch 1 thread", 20, True, {}, 1),
)


def measure(clusters: int, limited: bool, steps: int, images: int) -> dict[str, float]:
    """In this process: fit the clusters, then time the training step."""
    gan_fitting.CLUSTER_IMAGES = images
    if not limited:  # the clustering as it ran before: every pool at its default size
        gan_fitting.one_native_thread = contextlib.nullcontext
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = gan_trainer(Path(tmp), clusters)
        config = trainer.config
        started = time.perf_counter()
        gan_fitting.fit_clusters(trainer.model, trainer.data.train.sequential(config.batch_size))
        fit_seconds = time.perf_counter() - started
        for _ in range(3):
            trainer.step(0.0)
        times = time_call(lambda: trainer.step(0.0), torch.device("cpu"), repeats=steps)
    return {"fit_s": fit_seconds, "images_per_s": config.batch_size / median(times)}


def run_child(clusters: int, limited: bool, env: dict[str, str], threads: int | None, steps: int,
              images: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", json.dumps([clusters, limited, steps, images])]
    if threads is not None:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 images and a few steps: a smoke test")
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="busy processes beside (default: one per CPU)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        clusters, limited, steps, images = json.loads(args.child)
        print(json.dumps(measure(clusters, limited, steps, images)))
        return

    steps, images = (5, 1000) if args.quick else (30, 5000)
    record = Results(__file__, args.quick)
    with busy_processes(args.load):
        results = [(label, run_child(clusters, limited, env, threads, steps, images))
                   for label, clusters, limited, env, threads in CONFIGURATIONS]
    reference = results[0][1]["images_per_s"]
    rows = [[label, "-" if clusters == 0 else f"{r['fit_s']:.1f}", fmt_rate(r["images_per_s"]),
             fmt_ratio(r["images_per_s"] / reference)]
            for (label, r), (_, clusters, *_rest) in zip(results, CONFIGURATIONS, strict=True)]
    record.note(environment())
    record.note(f"{args.load} busy processes beside; clustering on {images:,} mnist images; training step "
                f"images/s: median of {steps} steps after 3 warm-up steps, each row a fresh process.")
    record.table("GAN clustering and training step under load",
                 ["configuration", "clustering s", "step images/s", "vs --clusters 0"], rows)
    record.write()


if __name__ == "__main__":
    main()
