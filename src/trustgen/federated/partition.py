"""Splitting a text corpus or an image set among federated clients, each with its own held-out part.

The unit is one speech (a speaker's line `NAME:` and what follows it up to the next blank
line), so every scheme hands out the same text and only who holds it changes:

- `iid`: speeches dealt to clients uniformly at random;
- `by-play`: whole plays (documents), balanced greedily by size;
- `by-speaker`: LEAF's Shakespeare benchmark (Caldas et al. 2018, arXiv:1812.01097), where
  each speaking role of each play is a client: the N roles with the most text;
- `dirichlet:A`: each play's speeches spread over clients in proportions drawn from
  Dirichlet(A) (Hsu et al. 2019, arXiv:1909.06335); small A is very non-IID.

Images partition by class: `iid` deals them out uniformly at random, `dirichlet:A` spreads
each class's images over clients in Dirichlet(A) proportions (the same scheme over class labels
instead of plays).

Each client keeps every tenth of its speeches (images) as held-out data (LEAF splits each
client's samples, not the clients), so per-client held-out loss measures how the global model
serves that client.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trustgen import io
from trustgen.data.images import ImageDataset
from trustgen.data.text import DOCUMENT_SEPARATOR, Document
from trustgen.errors import TrustgenError

SCHEMES = ("iid", "by-play", "by-speaker", "dirichlet:A")
IMAGE_SCHEMES = ("iid", "dirichlet:A")
IMAGE_FILES = ("train.npz", "val.npz")
HELD_OUT_EVERY = 10
_SPEAKER_LINE = re.compile(r"^([A-Z][A-Za-z '\-\.,&]*):$")


@dataclass(frozen=True)
class Speech:
    play: str
    speaker: str
    text: str


@dataclass(frozen=True)
class ClientText:
    """One client's share of the corpus: its name (a role, a play list or a number), training
    and held-out text."""

    name: str
    train: str
    val: str

    def write(self, folder: Path) -> None:
        io.atomic_write_text(folder / "train.txt", self.train)
        io.atomic_write_text(folder / "val.txt", self.val)


@dataclass(frozen=True)
class ClientImages:
    """One client's share of an image set: its name, training and held-out images."""

    name: str
    train: ImageDataset
    val: ImageDataset

    def write(self, folder: Path) -> None:
        for file, part in zip(IMAGE_FILES, (self.train, self.val), strict=True):
            tmp = folder / f"{file}.tmp.npz"
            np.savez(tmp, images=part.images, labels=part.labels)
            tmp.replace(folder / file)


def read_client_images(folder: Path) -> tuple[ImageDataset, ImageDataset]:
    """A client's training and held-out images, as `ClientImages.write` left them."""
    parts = []
    for file in IMAGE_FILES:
        path = Path(folder) / file
        if not path.is_file():
            raise TrustgenError(f"the client data folder {folder} has no {file}.")
        with np.load(path, allow_pickle=False) as stored:
            parts.append(ImageDataset(Path(folder).name, stored["images"], stored["labels"]))
    return parts[0], parts[1]


def speeches(documents: list[Document]) -> list[Speech]:
    """Every speech of every document, in order."""
    found = []
    for doc in documents:
        for block in doc.read().split("\n\n"):
            first = block.strip().split("\n", 1)[0]
            match = _SPEAKER_LINE.match(first)
            if match and "\n" in block.strip():
                found.append(Speech(doc.name, match.group(1), block.strip()))
    return found


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """("dirichlet", alpha) or (scheme, None); a sentence for anything else."""
    if scheme.startswith("dirichlet:"):
        try:
            alpha = float(scheme.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if not alpha > 0:
            raise TrustgenError(f"--partition {scheme}: write dirichlet:A with A a positive number, e.g. dirichlet:0.3.")
        return "dirichlet", alpha
    if scheme not in SCHEMES:
        raise TrustgenError(f"--partition {scheme} is not a partition; choose one of {', '.join(SCHEMES)}.")
    return scheme, None


def partition(documents: list[Document], clients: int, scheme: str, seed: int) -> list[ClientText]:
    """The corpus split among `clients` clients by `scheme`, each with held-out text."""
    kind, alpha = parse_scheme(scheme)
    if clients < 1:
        raise TrustgenError(f"--clients must be at least 1, got {clients}.")
    units = speeches(documents)
    if len(units) < clients * HELD_OUT_EVERY:
        raise TrustgenError(f"the corpus has {len(units)} speeches (blocks starting with 'NAME:'), too few for "
                            f"{clients} clients; federated text partitions need a play-formatted corpus.")
    rng = np.random.default_rng(seed)
    if kind == "by-speaker":
        groups = _by_speaker(units, clients)
    elif kind == "by-play":
        groups = _by_play(units, clients)
    else:
        owner = (_dirichlet_owners([u.play for u in units], clients, alpha, rng) if kind == "dirichlet"
                 else rng.integers(clients, size=len(units)))
        groups = [(f"client-{i}", [units[j] for j in np.flatnonzero(owner == i)]) for i in range(clients)]
    return [_split(name, group) for name, group in groups]


def partition_images(dataset: ImageDataset, clients: int, scheme: str, seed: int) -> list[ClientImages]:
    """The images split among `clients` clients by `scheme` (iid, or dirichlet:A over their
    classes), each holding out every tenth of its images."""
    kind, alpha = parse_scheme(scheme)
    if kind not in ("iid", "dirichlet"):
        raise TrustgenError(f"--partition {scheme} is for plays; images partition {' or '.join(IMAGE_SCHEMES)} "
                            "(over their classes).")
    if clients < 1:
        raise TrustgenError(f"--clients must be at least 1, got {clients}.")
    if kind == "dirichlet" and (dataset.labels < 0).any():
        raise TrustgenError(f"--partition {scheme} spreads each class over the clients; {dataset.name} has no "
                            "classes (put each class's images in its own sub-folder) — use iid.")
    rng = np.random.default_rng(seed)
    owner = (_dirichlet_owners(list(dataset.labels), clients, alpha, rng) if kind == "dirichlet"
             else rng.integers(clients, size=len(dataset.labels)))
    parts = []
    for i in range(clients):
        mine = np.flatnonzero(owner == i)
        _check_held_out(f"client-{i}", len(mine), "images")
        held = _held_out(len(mine))
        parts.append(ClientImages(f"client-{i}", dataset.subset(mine[~held]), dataset.subset(mine[held])))
    return parts


def _by_speaker(units: list[Speech], clients: int) -> list[tuple[str, list[Speech]]]:
    roles: dict[tuple[str, str], list[Speech]] = defaultdict(list)
    for unit in units:
        roles[(unit.play, unit.speaker)].append(unit)
    if len(roles) < clients:
        raise TrustgenError(f"the corpus has {len(roles)} speaking roles, fewer than {clients} clients.")
    largest = sorted(roles.items(), key=lambda kv: (-sum(len(u.text) for u in kv[1]), kv[0]))[:clients]
    return [(f"{speaker} ({play})", group) for (play, speaker), group in largest]


def _by_play(units: list[Speech], clients: int) -> list[tuple[str, list[Speech]]]:
    plays: dict[str, list[Speech]] = defaultdict(list)
    for unit in units:
        plays[unit.play].append(unit)
    if len(plays) < clients:
        raise TrustgenError(f"the corpus has {len(plays)} plays, fewer than {clients} clients; use another partition.")
    groups: list[tuple[list[str], list[Speech]]] = [([], []) for _ in range(clients)]
    for play, group in sorted(plays.items(), key=lambda kv: (-sum(len(u.text) for u in kv[1]), kv[0])):
        names, held = min(groups, key=lambda g: sum(len(u.text) for u in g[1]))
        names.append(play)
        held.extend(group)
    return [(", ".join(names), held) for names, held in groups]


def _dirichlet_owners(keys: list, clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Each unit's client: the units of each key (a play, a class) spread over the clients in
    proportions drawn from Dirichlet(alpha), one draw per key."""
    keys_array = np.asarray(keys)
    owner = np.empty(len(keys_array), dtype=np.int64)
    for key in sorted(set(keys)):
        members = np.flatnonzero(keys_array == key)
        shares = rng.dirichlet([alpha] * clients)
        owner[members] = rng.choice(clients, size=len(members), p=shares)
    return owner


def _held_out(n: int) -> np.ndarray:
    """Which of a client's n units it holds out: every tenth."""
    return np.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def _check_held_out(name: str, count: int, what: str) -> None:
    if count < HELD_OUT_EVERY:
        raise TrustgenError(f"client {name!r} got {count} {what}, too few to hold some out; "
                            "use fewer clients or a less skewed partition.")


def _split(name: str, group: list[Speech]) -> ClientText:
    _check_held_out(name, len(group), "speeches")
    held = _held_out(len(group))
    val = [u.text for u, h in zip(group, held, strict=True) if h]
    train = [u.text for u, h in zip(group, held, strict=True) if not h]
    return ClientText(name, DOCUMENT_SEPARATOR.join(train) + "\n", DOCUMENT_SEPARATOR.join(val) + "\n")


def write_client_folders(parts: list[ClientText] | list[ClientImages], folder: Path) -> list[Path]:
    """One data folder per client (train.txt and val.txt, or train.npz and val.npz; name.txt):
    what a data owner keeps."""
    paths = []
    for i, part in enumerate(parts):
        path = Path(folder) / f"client-{i}"
        path.mkdir(parents=True, exist_ok=True)
        part.write(path)
        io.atomic_write_text(path / "name.txt", part.name + "\n")
        paths.append(path)
    return paths


__all__ = ["IMAGE_SCHEMES", "SCHEMES", "ClientImages", "ClientText", "partition", "partition_images",
           "read_client_images", "speeches", "write_client_folders"]
