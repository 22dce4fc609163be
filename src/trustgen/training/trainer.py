"""The one training loop for every model: text and image families, and any module with a
`loss(*batch)`.

`Trainer` owns a model, its objective and optimizers, the data and the run directory. `step()`
is the unit of work; `fit()` runs steps until the step or time budget is spent, evaluating,
logging and checkpointing on the way, with bf16 autocast where the hardware has it, optional
`torch.compile`, and checkpoints that resume bit-exactly: model, optimizers, step and every
random state (including the data sampler's, which *is* the data position) are saved together,
atomically.

`train_steps` runs the same objective and optimizer for a number of steps with no run
directory, no files and no change to the caller's random state: the training function of a
federated client (weights in and out through the model) or of a worker that a launcher starts.
Both take an optional `wrap(model, optimizers, data) -> (model, optimizers, data)`, applied
once before the first step: where a privacy engine puts its per-sample-gradient module, its
noisy optimizer and its sampler. The wrapped data must still answer
`sample(batch_size, generator)`; checkpoints keep saving the unwrapped model. A wrapped source
may also answer `progress()` (a budget of its own: training stops at 1), `metrics()` (logged
and shown each log interval), `record()` (added to summary.json) and `state_dict()` /
`load_state_dict()` (kept in the checkpoint): a privacy accountant.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustgen import io, runtime
from trustgen.config import TrainConfig
from trustgen.errors import TrainingInterrupted, TrustgenError
from trustgen.models.registry import family_of
from trustgen.progress import progress_bar, status
from trustgen.training import checkpoint
from trustgen.training.data import TrainingData
from trustgen.training.logs import MetricsLog, plot_losses
from trustgen.training.objectives import Objective, make_objective
from trustgen.training.optim import learning_rate

EVAL_SEED = 1234
FULL_EVAL_TOKENS = 2_000_000  # a larger validation split is sampled evenly down to this size

Optimizers = dict[str, torch.optim.Optimizer]
Wrap = Callable[[nn.Module, Optimizers, Any], tuple[nn.Module, Optimizers, Any]]


def draw_batches(source: Any, config: TrainConfig, generator: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """The batches of one optimizer step: grad_accum batches of batch_size rows."""
    return [source.sample(config.batch_size, generator) for _ in range(config.grad_accum)]


def check_finite(stats: dict[str, float], step: int, config: TrainConfig) -> None:
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        clip = (f"lower the gradient clip (--grad-clip, grad_clip in Python; now {config.grad_clip:g})"
                if config.grad_clip > 0 else "turn gradient clipping on (--grad-clip 1, grad_clip in Python; now off)")
        raise TrustgenError(f"the training {bad[0]} became {stats[bad[0]]} at step {step}; lower the learning rate "
                            f"(--lr, learning_rate in Python; now {config.learning_rate:g}) or {clip}.")


def training_progress(config: TrainConfig, step: int, elapsed: float) -> float:
    """How much of the step or time budget `step` steps in `elapsed` seconds have spent (1: done)."""
    fractions = []
    if config.max_steps is not None:
        fractions.append(step / config.max_steps)
    if config.time_budget is not None:
        fractions.append(elapsed / config.time_budget)
    return max(fractions)


def apply_wrap(wrap: Wrap | None, objective: Objective, source: Any) -> Any:
    """Hand the objective's model and optimizers and the training source to `wrap`; the
    objective trains what it returns. Returns the (wrapped) training source."""
    if wrap is None:
        return source
    model, optimizers, source = wrap(objective.model, objective.optimizers, source)
    objective.use(model, optimizers)
    return source


class StopSignals:
    """While installed, SIGINT (Ctrl-C) and SIGTERM (what schedulers send) only ask the loop to
    stop: it finishes the step it is in, so the checkpoint it then writes holds the sampler and
    random states of whole steps and a resumed run continues bit-exactly. A second signal acts
    as it would have without this. Python takes signals in the main thread only; elsewhere
    nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._ask) for s in self.SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _ask(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            self.restore()
            signal.raise_signal(signum)
        self.signal = signal.Signals(signum)


class Trainer:
    """Owns a model, its objective and optimizers, the data and the run directory.

    `step()` is the unit of work; `fit()` runs steps until the budget ends, evaluating, logging
    and checkpointing on the way.
    """

    def __init__(self, run_dir: Path | None, config: TrainConfig, model: nn.Module, data: TrainingData,
                 device: torch.device, wrap: Wrap | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = config
        self.device = device
        self.model = model.to(device)
        if data.unit == "images":
            self.model.to(memory_format=torch.channels_last)  # see runtime.to_device
        self.data = data
        # A registered family may fit things from the data before and after training.
        self.family = family_of(model.family) if hasattr(model, "family") else None
        self.objective = make_objective(self.model, config, device)
        self.train_source = apply_wrap(wrap, self.objective, data.train)
        self.autocast = runtime.autocast_context(device, config.precision)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self.elapsed = 0.0  # seconds of training over all sessions of this run
        self.items_seen = 0
        self.best_val_loss = math.inf
        self.last_train_loss = math.nan
        self.saved_at = time.perf_counter()  # when the last checkpoint was written
        self.pending_files: dict[str, bytes] = {}  # committed together with the next checkpoint

    @property
    def rows_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum

    @property
    def metric_fields(self) -> list[str]:
        unit = self.data.unit
        return ["step", "time_s", unit, "lr", "train_loss", "val_loss", f"{unit}_per_s",
                *self.objective.metric_names, *self._source_metrics()]

    def _source_metrics(self) -> dict[str, float]:
        metrics = getattr(self.train_source, "metrics", None)
        return metrics() if metrics is not None else {}

    # ---- one optimisation step ----
    def step(self, progress: float) -> dict[str, float]:
        """One optimizer step (or one round of the GAN game); returns the training losses."""
        lr = learning_rate(self.config, self.step_count, progress)
        self.objective.model.train()
        stats = self.objective.step(draw_batches(self.train_source, self.config, self.sampler), lr, self.autocast)
        self.step_count += 1
        self.items_seen += self.rows_per_step * self.data.items_per_row
        self.last_train_loss = stats.get("train_loss", math.nan)  # a GAN has two losses instead
        return stats

    @torch.no_grad()
    def evaluate(self, full: bool = False) -> dict[str, float]:
        """Validation losses (val_loss in nats per token or image): on fixed random windows, or
        the whole split once (text: up to FULL_EVAL_TOKENS). Empty for a GAN, which has none."""
        self.objective.model.eval()
        if full:
            max_rows = FULL_EVAL_TOKENS // self.data.items_per_row
            batches: Iterator = self.data.val.sequential(self.config.batch_size, max_rows)
        else:
            generator = torch.Generator().manual_seed(EVAL_SEED)
            batches = (self.data.val.sample(self.config.batch_size, generator)
                       for _ in range(self.config.eval_batches))
        return self.objective.evaluate(batches, self.autocast)

    # ---- checkpoints ----
    def save_checkpoint(self) -> None:
        checkpoint.save_checkpoint(self._run_dir(), self.model, self.objective.optimizers, {
            "step": self.step_count,
            "elapsed_s": self.elapsed,
            f"{self.data.unit}_seen": self.items_seen,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "last_train_loss": None if math.isnan(self.last_train_loss) else self.last_train_loss,
            "rng": {"sampler": checkpoint.encode_rng_state(self.sampler.get_state()),
                    "torch": checkpoint.encode_rng_state(torch.get_rng_state())},
            "data": self.data.summary,
            # Float sums split over a different number of threads round differently: a resume
            # uses this count again unless told otherwise (cli._set_threads), to continue exactly.
            "threads": torch.get_num_threads(),
            **({"source": self.train_source.state_dict()} if hasattr(self.train_source, "state_dict") else {}),
        }, self.pending_files)
        self.pending_files = {}
        self.saved_at = time.perf_counter()

    def load_checkpoint(self) -> None:
        """Continue from the run directory's last checkpoint: weights, optimizers, counters and
        random states (the global torch state too: dropout and noise continue where they were)."""
        run_dir = self._run_dir()
        try:
            state = checkpoint.load_checkpoint(run_dir, self.model, self.objective.optimizers)
            self.sampler.set_state(checkpoint.decode_rng_state(state["rng"]["sampler"]))
            torch.set_rng_state(checkpoint.decode_rng_state(state["rng"]["torch"]))
            self.step_count = int(state["step"])
            self.elapsed = float(state["elapsed_s"])
            self.items_seen = int(state[f"{self.data.unit}_seen"])
            if hasattr(self.train_source, "load_state_dict"):
                self.train_source.load_state_dict(state["source"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise TrustgenError(f"the checkpoint in {run_dir} is corrupt or foreign ({exc}).") from None
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        last = state.get("last_train_loss")
        self.last_train_loss = math.nan if last is None else float(last)

    def _run_dir(self) -> Path:
        if self.run_dir is None:
            raise TrustgenError("this trainer has no run directory to keep checkpoints and logs in; "
                                "use train_steps to train without one.")
        return self.run_dir

    # ---- the loop ----
    def progress(self) -> float:
        done = training_progress(self.config, self.step_count, self.elapsed)
        if hasattr(self.train_source, "progress"):  # a private source stops when its planned steps are spent
            done = max(done, self.train_source.progress(self.elapsed))
        return done

    def fit(self, show_progress: bool = True) -> dict[str, Any]:
        """Train until the step or time budget is spent; checkpoint at every evaluation (the
        last step's included) and every checkpoint_interval seconds. SIGINT and SIGTERM stop it
        after the step in progress, with a checkpoint (`StopSignals`, `TrainingInterrupted`)."""
        if self.device.type == "cpu":
            runtime.keep_freed_memory()
        with runtime.flush_denormals(self.device):
            return self._fit(show_progress)

    def _fit(self, show_progress: bool) -> dict[str, Any]:
        run_dir = self._run_dir()
        # What a model fits from the training data before the first step: a GAN's clusters.
        if self.family is not None and self.family.start_training is not None and self.step_count == 0:
            with status("preparing the model on the training data", show_progress):
                self.family.start_training(self.model, self.data.train.sequential(self.config.batch_size))
        log = MetricsLog(run_dir, self.step_count, self.metric_fields)
        bar = self._progress_bar() if show_progress else None
        unit = self.data.unit
        window_start, window_items = time.perf_counter(), 0
        self.saved_at = time.perf_counter()
        stop = StopSignals()
        try:
            stop.install()
            while self.progress() < 1.0:
                started = time.perf_counter()
                stats = self.step(self.progress())
                check_finite(stats, self.step_count, self.config)
                self.elapsed += time.perf_counter() - started
                window_items += self.rows_per_step * self.data.items_per_row
                row: dict[str, Any] = {}
                if self.step_count % self.config.log_interval == 0:
                    now = time.perf_counter()
                    rate = window_items / max(now - window_start, 1e-9)
                    window_start, window_items = now, 0
                    row = {**stats, f"{unit}_per_s": rate, **self._source_metrics()}
                    if bar is not None:
                        shown = {k.replace("train_", ""): f"{v:.3f}" for k, v in list(stats.items())[:2]}
                        shown.update({k: f"{v:.2f}" for k, v in self._source_metrics().items()})
                        bar.set_postfix(**shown, **{f"{unit[:3]}_s": f"{rate:,.0f}"}, refresh=False)
                if self.step_count % self.config.eval_interval == 0 or self.progress() >= 1.0:
                    started = time.perf_counter()
                    val = self.evaluate()
                    if "val_loss" in val:
                        self.best_val_loss = min(self.best_val_loss, val["val_loss"])
                        if bar is not None:
                            bar.set_postfix(loss=f"{self.last_train_loss:.3f}", val=f"{val['val_loss']:.3f}",
                                            **{k: f"{v:.2f}" for k, v in self._source_metrics().items()},
                                            refresh=False)
                    row.update(val)
                    self.save_checkpoint()
                    self.elapsed += time.perf_counter() - started
                elif stop.signal is not None or time.perf_counter() - self.saved_at >= self.config.checkpoint_interval:
                    # By time too, so a run is resumable from its first seconds.
                    self.save_checkpoint()
                if row:
                    row.update(step=self.step_count, time_s=round(self.elapsed, 3), lr=self.current_lr(),
                               **{unit: self.items_seen})
                    for key, value in stats.items():
                        row.setdefault(key, value)
                    log.write(row)
                if stop.signal is not None:
                    raise TrainingInterrupted(
                        f"training stopped by {stop.signal.name} at step {self.step_count}; the checkpoint is saved. "
                        f"Continue it with: trustgen train --resume {run_dir} (trustgen.resume in Python).",
                        exit_code=128 + stop.signal.value)
                if bar is not None:
                    self._advance(bar)
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            log.close()
        if self.pending_files:  # a resumed run that had no step left to take
            io.commit_files(run_dir, self.pending_files)
            self.pending_files = {}
        # What a model fits from the training data once training ends: a VAE's prior, a GAN's
        # standing statistics.
        if self.family is not None and self.family.finish_training is not None:
            with status("finishing the model on the training data", show_progress):
                self.family.finish_training(self.model, self.data.train.sequential(self.config.batch_size))
            self.save_checkpoint()
        with status("final evaluation on the validation data", show_progress):
            final = self.evaluate(full=True)
        summary: dict[str, Any] = {"step": self.step_count, "elapsed_s": self.elapsed,
                                   "final_val_loss": final.get("val_loss"),
                                   "best_val_loss": None}
        if "val_loss" in final:
            summary["best_val_loss"] = min(self.best_val_loss, final["val_loss"])
            summary.update({f"final_{k}": v for k, v in final.items() if k != "val_loss"})
        if hasattr(self.train_source, "record"):
            summary["privacy"] = self.train_source.record()
        io.write_json(run_dir / "summary.json", summary)
        plot_losses(run_dir)
        return summary

    def current_lr(self) -> float:
        return next(iter(self.objective.optimizers.values())).param_groups[0]["lr"]

    def _progress_bar(self) -> Any:
        if self.config.max_steps is not None and self.config.time_budget is None:
            bar = progress_bar(self.config.max_steps, "training", unit="step")
        else:
            bar = progress_bar(round(self.config.time_budget or 0, 1), "training", unit="s",
                               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [ETA {remaining}{postfix}]")
        self._advance(bar)
        return bar

    def _advance(self, bar: Any) -> None:
        bar.n = self.step_count if bar.unit == "step" else min(self.elapsed, bar.total)
        bar.refresh()


def train_steps(model: nn.Module, data: Any, config: TrainConfig, steps: int,
                device: str | torch.device = "cpu", *, seed: int | None = None, wrap: Wrap | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train `model` in place for `steps` optimizer steps on `data` (anything with
    `sample(batch_size, generator)`) with the objective, optimizer, schedule (warmup, then
    cosine decay over these steps), clipping and precision the trainer uses; returns the mean
    training losses over the steps, and `steps` and `rows`.

    Nothing is written and nothing global changes: the optimizer is fresh, the batches and the
    model's own randomness (dropout, noise) come from `seed` (default: config.seed) on a
    private stream, so the caller's random state is untouched. A federated client calls this
    with the weights it received loaded into `model` and sends back `model.state_dict()`.
    `on_step(step, losses)` is called after every step (a progress bar, a worker's log).
    """
    if steps < 1:
        raise TrustgenError(f"steps must be at least 1, got {steps}.")
    device = torch.device(device)
    seed = config.seed if seed is None else seed
    model.to(device)
    objective = make_objective(model, config, device)
    source = apply_wrap(wrap, objective, data)
    autocast = runtime.autocast_context(device, config.precision)
    sampler = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    with runtime.private_rng(seed), runtime.flush_denormals(device):
        objective.model.train()
        for step in range(steps):
            stats = objective.step(draw_batches(source, config, sampler), learning_rate(config, step, step / steps),
                                   autocast)
            check_finite(stats, step + 1, config)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / steps
            if on_step is not None:
                on_step(step + 1, stats)
    return {**totals, "steps": steps, "rows": steps * config.batch_size * config.grad_accum}


__all__ = ["EVAL_SEED", "FULL_EVAL_TOKENS", "StopSignals", "Trainer", "Wrap", "train_steps", "training_progress"]
