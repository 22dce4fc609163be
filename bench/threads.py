"""Training steps on a shared machine: torch's thread pool and OpenMP's wait policy.

torch's CPU wheel runs its intra-op parallelism on GNU OpenMP (libgomp), one thread per core.
At the end of every parallel region a thread that finished early waits for the others; by
default libgomp spins (busy-waits) a while before it sleeps. On a 2-core machine that other
processes share, the thread it waits for is often off its core, and the spinning thread burns
the time slice that thread needed. This script measures, each configuration in a fresh process
(libgomp reads `OMP_WAIT_POLICY` once, when torch loads it):

- the images/s of one step of the default GAN (`--clusters 0`: the step alone, no fitting), and
- the tokens/s of one step of the default GPT (a tiny GPT with --quick), both `Trainer.step`,

for torch's default threads with libgomp's default wait policy (trustgen before), with
`OMP_WAIT_POLICY=PASSIVE` (waiting threads sleep at once), with one torch thread, and as the CLI
runs now (`cli.choose_openmp_wait`: PASSIVE and torch's threads lowered to `cores.idle_cores()`
when other processes keep cores busy, torch's defaults when the machine is idle), each with no
extra load and beside `--load` busy-looping processes. Configurations and loads
alternate round by round, and the table reports the median over rounds, so that a change in
the machine's background load hits every row alike.

    python bench/threads.py              # the default models, 3 rounds: about 25 minutes under load
    python bench/threads.py --quick      # a tiny GPT, 1 round, 3 steps per cell: a smoke test
    taskset -c 0,1 python bench/threads.py   # a 2-core machine on a bigger one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch
from throughput import trustgen_step, write_token_file

from trustgen.api import train_config
from trustgen.cli import choose_openmp_wait
from trustgen.cores import idle_cores
from trustgen.models.registry import build_model, model_config
from trustgen.runtime import resolve_device
from trustgen.training.data import image_training_data
from trustgen.training.trainer import Trainer

# (label, extra environment (None: as the CLI chooses), torch threads: None torch's default,
# 0 as the CLI chooses); every child starts with OMP_WAIT_POLICY unset
CONFIGURATIONS = (
    ("torch's threads, libgomp's default wait (before)", {}, None),
    ("torch's threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
    ("1 torch thread", {}, 1),
    ("trustgen now: by the cores others keep busy", None, 0),
)
GPT_BATCH = 16  # the default TrainConfig.batch_size


def gan_trainer(folder: Path, clusters: int) -> Trainer:
    """The default GAN's trainer on built-in mnist, with `clusters` (its clusters not yet fitted)."""
    config = train_config({"max_steps": 10**6}, "gan")
    data, _, size, channels = image_training_data(config)
    torch.manual_seed(0)
    model = build_model("gan", model_config("gan", {"image_size": size, "channels": channels, "clusters": clusters}))
    return Trainer(folder, config, model, data, resolve_device("cpu"))


def gan_step(tmp: Path) -> tuple[Callable[[], object], int]:
    """The default GAN's `Trainer.step`, without the clustering before it."""
    trainer = gan_trainer(tmp, clusters=0)
    return lambda: trainer.step(0.0), trainer.config.batch_size


def gpt_step(tmp: Path, quick: bool) -> tuple[Callable[[], object], int]:
    """The default GPT's `Trainer.step` (precision auto, as `trustgen train`), on random tokens."""
    if quick:
        model = common.build_gpt(common.QUICK_MODEL)
    else:
        model = build_model("gpt", model_config("gpt", {"vocab_size": 65}))
    token_file = write_token_file(tmp, model.config.vocab_size)
    return trustgen_step(model, GPT_BATCH, "auto", torch.device("cpu"), token_file, tmp), \
        GPT_BATCH * model.config.block_size


def rate(step: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of the median step, timing steps for about `seconds` (at least 3) after one
    untimed step."""
    step()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return items / common.median(times)


def measure(quick: bool, seconds: float) -> dict[str, float]:
    torch.set_flush_denormal(True)  # as the trainer does
    with tempfile.TemporaryDirectory(prefix="trustgen-bench-") as tmp:
        gan, images = gan_step(Path(tmp))
        gpt, tokens = gpt_step(Path(tmp), quick)
        return {"images_per_s": rate(gan, images, seconds), "tokens_per_s": rate(gpt, tokens, seconds),
                "threads": torch.get_num_threads(), "passive": os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"}


def run_child(env: dict[str, str] | None, threads: int | None, quick: bool, seconds: float) -> dict[str, float]:
    if env is None:  # the CLI's choice, made now as `trustgen train` would make it
        env = {}
        choose_openmp_wait(["train"], env)
    command = [sys.executable, __file__, "--child", json.dumps([quick, seconds])]
    if threads is not None:
        command += ["--threads", str(threads)]
    child_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=child_env)
    return json.loads(result.stdout.splitlines()[-1])


def one_round(load: int, quick: bool, seconds: float) -> list[dict[str, float]]:
    with common.busy_processes(load):
        return [run_child(env, threads, quick, seconds) for _, env, threads in CONFIGURATIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 1 round, 3 steps per cell: a smoke test")
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="busy processes beside (default: one per CPU)")
    parser.add_argument("--rounds", type=int, help="rounds over every configuration and load (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.set_threads(idle_cores() if args.threads == 0 else args.threads)
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return

    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 0.0 if args.quick else 4.0
    loads = (0, args.load)
    record = common.Results(__file__, args.quick)
    # results[load][configuration] = one dict per round
    results: dict[int, list[list[dict[str, float]]]] = {load: [[] for _ in CONFIGURATIONS] for load in loads}
    for _ in range(rounds):
        for load in loads:
            for per_config, result in zip(results[load], one_round(load, args.quick, seconds), strict=True):
                per_config.append(result)
    rows = []
    for load in loads:
        reference = {key: common.median([r[key] for r in results[load][0]]) for key in ("images_per_s", "tokens_per_s")}
        for (label, _, _), per_round in zip(CONFIGURATIONS, results[load], strict=True):
            images = common.median([r["images_per_s"] for r in per_round])
            tokens = common.median([r["tokens_per_s"] for r in per_round])
            rows.append([f"+{load} busy" if load else "no extra load", label, int(per_round[0]["threads"]),
                         "PASSIVE" if per_round[0]["passive"] else "libgomp's default",
                         f"{images:,.1f}", common.fmt_ratio(images / reference["images_per_s"]),
                         common.fmt_rate(tokens), common.fmt_ratio(tokens / reference["tokens_per_s"])])
    record.note(common.environment())
    record.note(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; {rounds} round(s); "
                f"each cell the median over rounds of the median step, timed for about {seconds:.0f} s "
                f"(at least 3 steps) after one untimed step, each configuration a fresh process.")
    record.table("training steps under load: threads and wait policy",
                 ["extra load", "configuration", "torch threads", "wait policy", "GAN images/s", "GAN vs before",
                  "GPT tokens/s", "GPT vs before"], rows)
    record.write()


if __name__ == "__main__":
    main()
