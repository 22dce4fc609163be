"""Sampling images: prompts to class labels, latent interpolation, and pictures on disk.

Every image model answers `sample(n, labels, generator)` and `decode(z, labels)` with images in
[0, 1]; this module turns those into uint8 arrays, grids and strips, and writes the pictures a
run directory shows (`samples.png`, `interpolation.png`, and for a VAE `reconstructions.png`).
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trustgen import io
from trustgen.errors import TrustgenError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_TILE = 56  # pixels: small images are enlarged (nearest neighbour) so a grid stays legible
PICTURE_SEED = 0
PICTURES = ("samples.png", "interpolation.png", "reconstructions.png", "loss.png")  # what a run may show


def label_for_prompt(prompt: str, classes: Sequence[str]) -> int:
    """The class a prompt names: its name ("7", "cats"), any case, or a digit's English word."""
    if not classes:
        raise TrustgenError("this model was trained without classes, so it takes no prompt; "
                            "train with --conditional on labelled images to generate from a prompt.")
    wanted = prompt.strip().lower()
    if wanted in NUMBER_WORDS:
        wanted = str(NUMBER_WORDS.index(wanted))
    for index, name in enumerate(classes):
        if name.lower() == wanted:
            return index
    raise TrustgenError(f"unknown label {prompt!r}; this model knows: {', '.join(classes)}.")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (N, C, H, W) -> uint8 (N, C, H, W), rounded."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one picture (H', W', C) with the images in rows of `columns`,
    enlarged by a whole factor to at least MIN_TILE pixels."""
    n, channels, height, width = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    scale = max(1, -(-MIN_TILE // height))
    tiles = images.repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)  # (N, h, w, C)
    h, w = height * scale, width * scale
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, channels), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top: top + h, left: left + w] = tile
    return grid


def png_bytes(picture: np.ndarray) -> bytes:
    """(H, W, C) or (C, H, W)-free uint8 picture -> PNG file bytes."""
    from PIL import Image

    image = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_picture(picture: np.ndarray, path: Path) -> None:
    io.atomic_write_bytes(Path(path), png_bytes(picture))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latent rows a and b (B, D) at fractions t (T,) ->
    (B, T, D). Gaussian latents live near a sphere, where straight lines cut through the
    low-density middle (White 2016, arXiv:1609.04468)."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(dim=1).clamp(-1 + 1e-7, 1 - 1e-7)).unsqueeze(1)  # (B, 1)
    t = t.view(1, -1, 1)
    sin = torch.sin(omega).unsqueeze(1)
    wa = torch.sin((1 - t) * omega.unsqueeze(1)) / sin
    wb = torch.sin(t * omega.unsqueeze(1)) / sin
    return wa * a.unsqueeze(1) + wb * b.unsqueeze(1)


@torch.no_grad()
def sample_images(model: nn.Module, n: int, labels: torch.Tensor | None = None, seed: int | None = None,
                  batch_size: int = 500) -> np.ndarray:
    """n images as uint8 (n, C, H, W), in batches; the same seed gives the same images."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed if seed is not None else torch.seed())
    out = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        batch_labels = None if labels is None else labels[start: start + rows].to(device)
        out.append(to_uint8(model.sample(rows, batch_labels, generator)))
    return np.concatenate(out)


@torch.no_grad()
def interpolate(model: nn.Module, steps: int, rows: int = 1, labels: torch.Tensor | None = None,
                seed: int | None = None) -> np.ndarray:
    """`rows` walks of `steps` images each between two latents drawn from the model's prior:
    uint8 (rows * steps, C, H, W)."""
    if steps < 2:
        raise TrustgenError(f"an interpolation needs at least 2 steps, got {steps}.")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed if seed is not None else torch.seed())
    ends = model.draw_latents(2 * rows, generator).view(2, rows, -1)
    path = slerp(ends[0], ends[1], torch.linspace(0, 1, steps, device=device)).flatten(0, 1)
    walk_labels = None if labels is None else labels.to(device).repeat_interleave(steps)
    return to_uint8(model.decode(path, walk_labels))


def class_rows(n_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,...,1,1,...: one grid row per class."""
    return torch.arange(n_classes).repeat_interleave(per_class)


def write_run_pictures(run_dir: Path, model: nn.Module, held_out: object) -> list[str]:
    """samples.png (one row per class for a conditional model), interpolation.png, and for a
    VAE reconstructions.png of held-out images; returns the file names."""
    run_dir = Path(run_dir)
    n_classes = model.config.n_classes
    if n_classes:
        labels = class_rows(n_classes, 8)
        save_picture(make_grid(sample_images(model, len(labels), labels, PICTURE_SEED), columns=8),
                     run_dir / "samples.png")
        walk_labels = torch.arange(min(n_classes, 8))
    else:
        save_picture(make_grid(sample_images(model, 64, None, PICTURE_SEED), columns=8), run_dir / "samples.png")
        walk_labels = None
    rows = 8 if walk_labels is None else len(walk_labels)
    save_picture(make_grid(interpolate(model, 10, rows, walk_labels, PICTURE_SEED), columns=10),
                 run_dir / "interpolation.png")
    written = ["samples.png", "interpolation.png"]
    if hasattr(model, "reconstruct"):
        x, y = next(held_out.sequential(16))
        with torch.no_grad():
            model.eval()
            device = next(model.parameters()).device
            recon = model.reconstruct(x.to(device), y.to(device) if n_classes else None)
        pairs = np.concatenate([to_uint8(x), to_uint8(recon)])
        save_picture(make_grid(pairs, columns=16), run_dir / "reconstructions.png")
        written.append("reconstructions.png")
    return written

