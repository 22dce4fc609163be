"""The one training loop for every model family, text and image.

AdamW with warmup + cosine decay, gradient accumulation and clipping, bf16 autocast where the
hardware has it, optional `torch.compile`, periodic evaluation, a time or step budget, and
checkpoints that resume bit-exactly: model, optimizers, step and every random state (including
the data sampler's, which *is* the data position) are saved together, atomically.

What a step optimises is the objective's business: `Likelihood` minimises a model's own
`loss(*batch)` (next-token cross-entropy, the VAE's negative ELBO) with one optimizer;
`training.adversarial.Adversarial` plays the GAN's two-optimizer game. Data is anything with
`sample(batch_size, generator)` and `sequential(batch_size, max_rows)`: token windows or images.
"""

from __future__ import annotations

import base64
import csv
import ctypes
import itertools
import json
import logging
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustgen import io, runs
from trustgen.config import TrainConfig
from trustgen.data.images import ImageBatches, load_images, split_images
from trustgen.data.text import (
    DOCUMENT_SEPARATOR,
    Document,
    Split,
    TokenWindows,
    find_documents,
    iter_text,
    scrub_documents,
    split_documents,
    tokenize_to_file,
)
from trustgen.data.tokenizers import Tokenizer, train_tokenizer
from trustgen.errors import TrustgenError
from trustgen.models.registry import build_model, family_of, model_config
from trustgen.sample.images import write_run_pictures

log = logging.getLogger("trustgen")
EVAL_SEED = 1234
FULL_EVAL_TOKENS = 2_000_000  # a larger validation split is sampled evenly down to this size


# -- devices and precision ------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrustgenError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrustgenError("device cuda was asked for but no CUDA GPU is available.")
    return device


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 matrix products run natively: recent GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU while training: once weights and Adam's second
    moments get small, subnormals can make x86 arithmetic several times slower. The flag is
    process-wide, so it is switched off again afterwards rather than left changing the
    numerics of the caller's other code."""
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_HEAP_TOP = 256 << 20  # freed memory at the top of the heap past this goes back to the OS
_LARGEST_HEAP_BLOCK = 32 << 20  # larger blocks are mapped on their own (glibc's own upper limit)


def keep_freed_memory() -> None:
    """Ask glibc's allocator to keep the memory a training step frees for the next step instead
    of handing it back to the OS and faulting it in again. With its default, adaptive thresholds,
    glibc trimmed the heap about 100 times a second during a VAE's training here: 90,000 page
    faults a second, and 400 training steps took 62.5 s instead of 51.9 s (bench/image_speed.py
    compares the two in fresh processes). The process keeps its peak heap afterwards, as the
    jemalloc and tcmalloc allocators that PyTorch's CPU tuning guide suggests do. Process-wide,
    and nothing happens off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_HEAP_TOP)
    libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK)


def autocast_context(device: torch.device, precision: str) -> Any:
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_fast(device))
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# -- data -----------------------------------------------------------------------------------

@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Path
    val: Path
    summary: dict[str, Any] = field(default_factory=dict)
    split: Split | None = None  # the documents as trained on (scrubbed, with canaries): the audit reads them
    canaries: dict[str, Any] | None = None  # what canaries.json records, when --canaries inserted some


def prepare_data(config: TrainConfig, tokenizer: Tokenizer | None = None, progress: bool = False) -> PreparedData:
    """Find, split and tokenize the corpus (training the tokenizer unless one is given)."""
    documents = find_documents(config.data)
    scrubbed: dict[str, int] | None = None
    if config.scrub_pii:
        documents, scrubbed = scrub_documents(documents)
        found = ", ".join(f"{n} {kind}" for kind, n in scrubbed.items()) or "nothing"
        log.info(f"scrubbed personal data from the corpus before training: {found}")
    split = split_documents(config.data, documents, config.val_fraction, config.seed)
    swapped: int | None = None
    if config.counterfactual_augment:
        # Counterfactual data augmentation (trustgen.evaluate.fairness): every training document
        # also appears with its gendered words swapped. Only the training split: held-out text
        # stays as written, so validation loss means the same with and without it.
        from trustgen.evaluate.fairness import augment_documents

        train_docs, swapped = augment_documents(split.train, config.counterfactual_augment)
        documents = [*documents, *train_docs[len(split.train):]]
        split = Split(train_docs, split.val)
        log.info(f"counterfactual augmentation ({config.counterfactual_augment}): {swapped} words swapped "
                 f"in {len(train_docs) // 2} added copies of the training documents")
    canaries = None
    if config.canaries:
        # The secrets go into a training document of their own, after the split, so that none
        # lands in the held-out text; they are drawn from the run's seed, so resuming rebuilds
        # the same corpus. The char vocabulary below sees them too.
        from trustgen.evaluate.memorization import (
            CANARY_DOCUMENT,
            canary_record,
            canary_text,
            make_canaries,
        )

        inserted, controls = make_canaries(config.canaries, config.seed)
        canary_doc = Document(CANARY_DOCUMENT, text=canary_text(inserted, config.seed))
        split = Split([*split.train, canary_doc], split.val)
        documents = [*documents, canary_doc]
        canaries = canary_record(inserted, controls)
    if tokenizer is None:
        # The char vocabulary covers the whole corpus so validation text is always encodable;
        # BPE merges are learned from the training split alone.
        if config.tokenizer == "char":
            chunks = itertools.chain(iter_text(documents), [DOCUMENT_SEPARATOR])
        else:
            chunks = iter_text(split.train)
        tokenizer = train_tokenizer(config.tokenizer, chunks, config.vocab_size)
    total = sum(d.size for d in documents)
    bar = _bar(total, "tokenizing", unit="B", unit_scale=True) if progress else None
    update = bar.update if bar is not None else None
    train_path = tokenize_to_file(split.train, tokenizer, update)
    val_path = tokenize_to_file(split.val, tokenizer, update)
    if bar is not None:
        bar.close()
    summary = {
        "source": config.data,
        "documents": len(documents),
        "train_documents": len(split.train),
        "val_documents": [d.name for d in split.val][:20],
        "bytes": total,
        "train_tokens": train_path.stat().st_size // _itemsize(train_path),
        "val_tokens": val_path.stat().st_size // _itemsize(val_path),
    }
    if scrubbed is not None:
        summary["pii_scrubbed"] = scrubbed
    if swapped is not None:
        summary["counterfactual_augment"] = {"axis": config.counterfactual_augment, "swapped_words": swapped}
    if canaries is not None:
        summary["canaries"] = len(canaries["inserted"])
    return PreparedData(tokenizer, train_path, val_path, summary, split, canaries)


@dataclass
class TrainingData:
    """What the trainer draws from: training and validation batches, in some unit of data."""

    train: Any  # sample(batch_size, generator) -> tuple of tensors; sequential(batch_size, max_rows)
    val: Any
    summary: dict[str, Any]
    unit: str  # "tokens" or "images": what the progress counts
    items_per_row: int  # tokens per window, or 1 image


def text_training_data(prepared: PreparedData, block_size: int) -> TrainingData:
    return TrainingData(TokenWindows(prepared.train, block_size), TokenWindows(prepared.val, block_size),
                        prepared.summary, "tokens", block_size)


def image_training_data(config: TrainConfig) -> tuple[TrainingData, tuple[str, ...], int, int]:
    """Training batches of the dataset's training split, validation on its held-out split;
    also the class names, image size and channels the model must match."""
    dataset = load_images(config.data, config.image_size)
    if dataset.skipped:
        shown = ", ".join(dataset.skipped[:5]) + (", ..." if len(dataset.skipped) > 5 else "")
        log.warning(f"skipped {len(dataset.skipped)} file(s) that are not readable images: {shown}")
    split = split_images(dataset)
    summary = {"source": config.data, "images": len(dataset.labels), "train_images": len(split.train.labels),
               "val_images": len(split.held_out.labels), "image_size": dataset.image_size,
               "channels": dataset.channels, "classes": list(dataset.classes),
               "skipped_files": list(dataset.skipped)}
    data = TrainingData(ImageBatches(split.train), ImageBatches(split.held_out), summary, "images", 1)
    return data, dataset.classes, dataset.image_size, dataset.channels


def _itemsize(path: Path) -> int:
    return 2 if ".uint16." in path.name else 4


def _bar(total: float, desc: str, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, **kwargs)


@contextmanager
def _status(what: str, show: bool) -> Iterator[None]:
    """A line saying what the trainer is busy with, for work that has no steps to count."""
    if not show:
        yield
        return
    bar = _bar(1, what, bar_format="{desc} [{elapsed}]")
    try:
        yield
    finally:
        bar.close()


# -- the trainer ----------------------------------------------------------------------------

def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_learning_rate over `progress`."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_learning_rate + cosine * (config.learning_rate - config.min_learning_rate)


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings only, never on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": lr or config.learning_rate, "betas": (config.beta1, config.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels are missing for this device or version
        return torch.optim.AdamW(groups, foreach=device.type != "cpu" or None, **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch; images (4-D) go channels-last, the layout oneDNN's convolutions run fastest
    in (bench/image_speed.py)."""
    return tuple(t.to(device, non_blocking=True, memory_format=torch.channels_last) if t.dim() == 4
                 else t.to(device, non_blocking=True) for t in batch)


class Likelihood:
    """One optimizer minimising the model's own `loss(*batch) -> (loss, terms)`."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.loss_fn = torch.compile(model.loss) if config.compile else model.loss
        self.optimizers = {"model": make_optimizer(model, config, device)}
        self.terms = tuple(model.loss_terms)
        self.metric_names = (*self.terms, *(f"val_{t}" for t in self.terms))

    def step(self, batches: list[tuple[torch.Tensor, ...]], lr: float, autocast: Any) -> dict[str, float]:
        optimizer = self.optimizers["model"]
        set_learning_rate(optimizer, lr)
        totals = dict.fromkeys(("train_loss", *self.terms), 0.0)
        for batch in batches:
            with autocast:
                loss, terms = self.loss_fn(*to_device(batch, self.device))
            (loss / len(batches)).backward()
            for name, value in (("train_loss", loss), *terms.items()):
                totals[name] += value.item() / len(batches)
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return totals

    @torch.no_grad()
    def evaluate(self, batches: Iterator[tuple[torch.Tensor, ...]], autocast: Any) -> dict[str, float]:
        """Validation loss and terms, averaged over rows."""
        sums: dict[str, float] = {}
        rows = 0
        for batch in batches:
            with autocast:
                loss, terms = self.loss_fn(*to_device(batch, self.device))
            n = len(batch[0])
            rows += n
            for name, value in (("val_loss", loss), *((f"val_{k}", v) for k, v in terms.items())):
                sums[name] = sums.get(name, 0.0) + value.item() * n
        return {name: total / rows for name, total in sums.items()}


class Trainer:
    """Owns a model, its objective and optimizers, the data and the run directory.

    `step()` is the unit of work (usable from a federated client or a distributed launcher);
    `fit()` runs steps until the budget ends, evaluating, logging and checkpointing on the way.
    """

    def __init__(self, run_dir: Path, config: TrainConfig, model: nn.Module, data: TrainingData,
                 device: torch.device) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.device = device
        self.model = model.to(device)
        if data.unit == "images":
            self.model.to(memory_format=torch.channels_last)  # see to_device
        self.data = data
        self.family = family_of(model.family)
        if self.family.objective == "adversarial":
            from trustgen.training.adversarial import Adversarial

            self.objective: Any = Adversarial(self.model, config, device)
        else:
            self.objective = Likelihood(self.model, config, device)
        self.autocast = autocast_context(device, config.precision)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self.elapsed = 0.0  # seconds of training over all sessions of this run
        self.items_seen = 0
        self.best_val_loss = math.inf
        self.last_train_loss = math.nan

    @property
    def rows_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum

    @property
    def metric_fields(self) -> list[str]:
        unit = self.data.unit
        return ["step", "time_s", unit, "lr", "train_loss", "val_loss", f"{unit}_per_s",
                *self.objective.metric_names]

    # ---- one optimisation step ----
    def step(self, progress: float) -> dict[str, float]:
        """One optimizer step (or one round of the GAN game); returns the training losses."""
        lr = learning_rate(self.config, self.step_count, progress)
        self.model.train()
        batches = [self.data.train.sample(self.config.batch_size, self.sampler)
                   for _ in range(self.config.grad_accum)]
        stats = self.objective.step(batches, lr, self.autocast)
        self.step_count += 1
        self.items_seen += self.rows_per_step * self.data.items_per_row
        self.last_train_loss = stats.get("train_loss", math.nan)  # a GAN has two losses instead
        return stats

    @torch.no_grad()
    def evaluate(self, full: bool = False) -> dict[str, float]:
        """Validation losses (val_loss in nats per token or image): on fixed random windows, or
        the whole split once (text: up to FULL_EVAL_TOKENS). Empty for a GAN, which has none."""
        self.model.eval()
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
        meta = {"step": str(self.step_count)}
        optimizer_tensors, optimizer_groups = {}, {}
        for name, optimizer in self.objective.optimizers.items():
            tensors, optimizer_groups[name] = _flatten_optimizer(optimizer.state_dict())
            optimizer_tensors.update({f"{name}.{key}": value for key, value in tensors.items()})
        state = {
            "step": self.step_count,
            "elapsed_s": self.elapsed,
            f"{self.data.unit}_seen": self.items_seen,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "last_train_loss": None if math.isnan(self.last_train_loss) else self.last_train_loss,
            "optimizer_param_groups": optimizer_groups,
            "rng": {"sampler": _encode_state(self.sampler.get_state()),
                    "torch": _encode_state(torch.get_rng_state())},
            "data": self.data.summary,
        }
        io.commit_files(self.run_dir, {
            "model.safetensors": io.weights_bytes(self.model, meta),
            "optimizer.safetensors": io.tensors_to_bytes(optimizer_tensors, meta),
            "trainer_state.json": (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(),
        })

    def load_checkpoint(self) -> None:
        io.recover(self.run_dir)
        state = io.read_json(self.run_dir / "trainer_state.json")
        io.load_weights(self.model, io.read_tensors(self.run_dir / "model.safetensors"),
                        self.run_dir / "model.safetensors")
        tensors = io.read_tensors(self.run_dir / "optimizer.safetensors")
        try:
            for name, optimizer in self.objective.optimizers.items():
                own = {key.split(".", 1)[1]: value for key, value in tensors.items()
                       if key.split(".", 1)[0] == name}
                optimizer.load_state_dict(_unflatten_optimizer(own, state["optimizer_param_groups"][name]))
                _match_layouts(optimizer)
            self.sampler.set_state(_decode_state(state["rng"]["sampler"]))
            torch.set_rng_state(_decode_state(state["rng"]["torch"]))
            self.step_count = int(state["step"])
            self.elapsed = float(state["elapsed_s"])
            self.items_seen = int(state[f"{self.data.unit}_seen"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise TrustgenError(f"the checkpoint in {self.run_dir} is corrupt or foreign ({exc}).") from None
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        last = state.get("last_train_loss")
        self.last_train_loss = math.nan if last is None else float(last)

    # ---- the loop ----
    def progress(self) -> float:
        fractions = []
        if self.config.max_steps is not None:
            fractions.append(self.step_count / self.config.max_steps)
        if self.config.time_budget is not None:
            fractions.append(self.elapsed / self.config.time_budget)
        return max(fractions)

    def fit(self, show_progress: bool = True) -> dict[str, Any]:
        """Train until the step or time budget is spent; checkpoint at every evaluation and at the end."""
        if self.device.type == "cpu":
            keep_freed_memory()
        with flush_denormals(self.device):
            return self._fit(show_progress)

    def _fit(self, show_progress: bool) -> dict[str, Any]:
        # What a model fits from the training data before the first step: a GAN's clusters.
        if self.family.start_training is not None and self.step_count == 0:
            with _status("preparing the model on the training data", show_progress):
                self.family.start_training(self.model, self.data.train.sequential(self.config.batch_size))
        log = MetricsLog(self.run_dir, self.step_count, self.metric_fields)
        bar = self._progress_bar() if show_progress else None
        unit = self.data.unit
        window_start, window_items = time.perf_counter(), 0
        try:
            while self.progress() < 1.0:
                started = time.perf_counter()
                stats = self.step(self.progress())
                bad = [k for k, v in stats.items() if not math.isfinite(v)]
                if bad:
                    raise TrustgenError(f"the training {bad[0]} became {stats[bad[0]]} at step {self.step_count}; "
                                        "lower the learning rate or turn on gradient clipping.")
                self.elapsed += time.perf_counter() - started
                window_items += self.rows_per_step * self.data.items_per_row
                row: dict[str, Any] = {}
                if self.step_count % self.config.log_interval == 0:
                    now = time.perf_counter()
                    rate = window_items / max(now - window_start, 1e-9)
                    window_start, window_items = now, 0
                    row = {**stats, f"{unit}_per_s": rate}
                    if bar is not None:
                        shown = {k.replace("train_", ""): f"{v:.3f}" for k, v in list(stats.items())[:2]}
                        bar.set_postfix(**shown, **{f"{unit[:3]}_s": f"{rate:,.0f}"}, refresh=False)
                if self.step_count % self.config.eval_interval == 0 or self.progress() >= 1.0:
                    started = time.perf_counter()
                    val = self.evaluate()
                    if "val_loss" in val:
                        self.best_val_loss = min(self.best_val_loss, val["val_loss"])
                        if bar is not None:
                            bar.set_postfix(loss=f"{self.last_train_loss:.3f}", val=f"{val['val_loss']:.3f}",
                                            refresh=False)
                    row.update(val)
                    self.save_checkpoint()
                    self.elapsed += time.perf_counter() - started
                if row:
                    row.update(step=self.step_count, time_s=round(self.elapsed, 3), lr=self.current_lr(),
                               **{unit: self.items_seen})
                    for key, value in stats.items():
                        row.setdefault(key, value)
                    log.write(row)
                if bar is not None:
                    self._advance(bar)
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise TrustgenError(f"training interrupted at step {self.step_count}; the checkpoint is saved. "
                                f"Continue with: trustgen train --resume {self.run_dir}") from None
        finally:
            if bar is not None:
                bar.close()
            log.close()
        # What a model fits from the training data once training ends: a VAE's prior, a GAN's
        # standing statistics.
        if self.family.finish_training is not None:
            with _status("finishing the model on the training data", show_progress):
                self.family.finish_training(self.model, self.data.train.sequential(self.config.batch_size))
            self.save_checkpoint()
        final = self.evaluate(full=True)
        summary: dict[str, Any] = {"step": self.step_count, "elapsed_s": self.elapsed,
                                   "final_val_loss": final.get("val_loss"),
                                   "best_val_loss": None}
        if "val_loss" in final:
            summary["best_val_loss"] = min(self.best_val_loss, final["val_loss"])
            summary.update({f"final_{k}": v for k, v in final.items() if k != "val_loss"})
        io.write_json(self.run_dir / "summary.json", summary)
        plot_losses(self.run_dir)
        return summary

    def current_lr(self) -> float:
        return next(iter(self.objective.optimizers.values())).param_groups[0]["lr"]

    def _progress_bar(self) -> Any:
        if self.config.max_steps is not None and self.config.time_budget is None:
            bar = _bar(self.config.max_steps, "training", unit="step")
        else:
            bar = _bar(round(self.config.time_budget or 0, 1), "training", unit="s",
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [ETA {remaining}{postfix}]")
        self._advance(bar)
        return bar

    def _advance(self, bar: Any) -> None:
        bar.n = self.step_count if bar.unit == "step" else min(self.elapsed, bar.total)
        bar.refresh()


# -- optimizer and RNG state as safetensors/JSON (never pickle) ------------------------------

def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment its parameter's memory layout: files hold contiguous tensors,
    but a channels-last parameter's moments are channels-last, and the fused Adam kernel walks
    them with the parameter's strides."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# -- metrics --------------------------------------------------------------------------------

class MetricsLog:
    """metrics.csv and TensorBoard events; rows past a resumed checkpoint are dropped."""

    def __init__(self, run_dir: Path, start_step: int, fields: list[str]) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.fields = fields
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 -- closed in close()
        self._csv = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(rows)
        self._file.flush()
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, Any]) -> None:
        self._csv.writerow({k: row.get(k, "") for k in self.fields})
        self._file.flush()
        for key in self.fields[3:]:  # lr, the losses and the rate
            if key in row:
                self._tb.add_scalar(key, row[key], row["step"])

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def plot_losses(run_dir: Path) -> None:
    """loss.png: every loss column of metrics.csv (training, validation, each GAN player) by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = [c for c in reader.fieldnames or [] if c.endswith("loss")]
    unit = "nats/token" if "tokens" in (reader.fieldnames or []) else "nats/image"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key in columns:
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            ax.plot(*zip(*points, strict=True), label=key.removesuffix("_loss").replace("val", "validation"),
                    marker="o" if key.startswith("val") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if "d_loss" in columns else f"loss ({unit})")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    if ax.lines:  # a run shorter than one log interval has nothing to show yet
        ax.legend()
    fig.tight_layout()
    tmp = Path(run_dir) / "loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(Path(run_dir) / "loss.png")


# -- entry points -----------------------------------------------------------------------------

IMAGE_SETTINGS_FROM_DATA = ("image_size", "channels", "n_classes")


def train(out: str | Path, config: TrainConfig, family: str = "gpt",
          model_settings: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a new model into the run directory `out`; returns the summary (losses, steps).

    Image families take `conditional=True` among the model settings for a class-conditional
    model; the image size, channels and classes come from the data."""
    run_dir = Path(out)
    if (run_dir / "config.json").exists():
        raise TrustgenError(f"{run_dir} already holds a run; choose another --out or continue it with --resume.")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if family_of(family).modality == "image":
        return _train_images(run_dir, config, family, dict(model_settings or {}), device, progress)
    tokenizer = None
    if config.init_from:
        base, tokenizer, base_config = runs.load_run_model(Path(config.init_from))
        family = base_config["family"]
        if model_settings:
            raise TrustgenError("--init-from takes the model settings from that run; don't give model settings too.")
        model_cfg = base.config
    prepared = prepare_data(config, tokenizer, progress=progress)
    if config.init_from:
        model = base
        _freeze(model, config.freeze_layers)
    else:
        settings = {**(model_settings or {}), "vocab_size": prepared.tokenizer.vocab_size}
        model_cfg = model_config(family, settings)
        model = build_model(family, model_cfg)
        if config.freeze_layers:
            raise TrustgenError("--freeze-layers only makes sense with --init-from.")
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared.tokenizer.save(run_dir / "tokenizer.json")
    runs.write_run_config(run_dir, family, model_cfg, prepared.tokenizer.kind, {"train": config.to_dict()})
    if prepared.canaries is not None:
        io.write_json(run_dir / "canaries.json", prepared.canaries)
    data = text_training_data(prepared, model.config.block_size)
    return Trainer(run_dir, config, model, data, device).fit(show_progress=progress)


def _train_images(run_dir: Path, config: TrainConfig, family: str, settings: dict[str, Any],
                  device: torch.device, progress: bool) -> dict[str, Any]:
    if config.init_from or config.freeze_layers:
        raise TrustgenError("fine-tuning (--init-from, --freeze-layers) is for text models.")
    if config.canaries:
        raise TrustgenError("--canaries inserts secret text into a text corpus; image runs take none.")
    given = sorted(set(settings) & set(IMAGE_SETTINGS_FROM_DATA))
    if given:
        raise TrustgenError(f"{', '.join(given)} come(s) from the data; set the size with image_size in the "
                            "training settings (--image-size) and use conditional=True (--conditional) for classes.")
    conditional = bool(settings.pop("conditional", False))
    data, classes, image_size, channels = image_training_data(config)
    if conditional and not classes:
        raise TrustgenError(f"--conditional needs labelled images; {config.data} has no classes (put each "
                            "class's images in its own sub-folder).")
    kind = family_of(family)
    defaults = kind.conditional_defaults if conditional else {}
    model_cfg = model_config(family, {**defaults, **settings, "image_size": image_size, "channels": channels,
                                      "n_classes": len(classes) if conditional else 0})
    model = build_model(family, model_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_run_config(run_dir, family, model_cfg, None, {"train": config.to_dict(), "classes": list(classes)})
    summary = Trainer(run_dir, config, model, data, device).fit(show_progress=progress)
    write_run_pictures(run_dir, model, data.val)
    return summary


def resume(run_dir: str | Path, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Continue a run from its last checkpoint; `overrides` may extend max_steps or time_budget."""
    run_dir = Path(run_dir)
    model, tokenizer, run_config = runs.load_run_model(run_dir)
    if not (run_dir / "trainer_state.json").exists():
        raise TrustgenError(f"{run_dir} has no trainer state to resume from (was it imported?).")
    config = TrainConfig.from_dict(run_config.get("train", {}))
    if overrides:
        config = config.replace(**overrides)
        run_config["train"] = config.to_dict()
        io.write_json(run_dir / "config.json", run_config)
    image = family_of(run_config["family"]).modality == "image"
    if image:
        data, *_ = image_training_data(config)
    else:
        data = text_training_data(prepare_data(config, tokenizer, progress=progress), model.config.block_size)
    if config.init_from:
        _freeze(model, config.freeze_layers)
    trainer = Trainer(run_dir, config, model, data, resolve_device(config.device))
    trainer.load_checkpoint()
    summary = trainer.fit(show_progress=progress)
    if image:
        write_run_pictures(run_dir, trainer.model, data.val)
    return summary


def _freeze(model: nn.Module, n_blocks: int) -> None:
    if n_blocks > model.n_blocks:
        raise TrustgenError(f"--freeze-layers {n_blocks} is more than the model's {model.n_blocks} layers.")
    if n_blocks == 0:
        return
    for item in model.frozen_prefix(n_blocks):
        for p in item.parameters() if isinstance(item, nn.Module) else [item]:
            p.requires_grad_(False)


__all__ = ["PreparedData", "Trainer", "TrainingData", "prepare_data", "resume", "train"]
