"""What the trainer draws batches from: a training and a validation source, in some unit.

A source is anything with `sample(batch_size, generator) -> tuple of tensors` (random rows for
a step) and `sequential(batch_size, max_rows)` (the whole split once, for exact evaluation):
token windows (`TokenWindows`) or images (`ImageBatches`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from trustgen.config import TrainConfig
from trustgen.data.images import ImageBatches, load_images, split_images
from trustgen.data.prepare import PreparedData
from trustgen.data.text import TokenWindows

log = logging.getLogger("trustgen")


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


__all__ = ["TrainingData", "image_training_data", "text_training_data"]
