"""Splitting a text corpus among federated clients, each with its own held-out text.

The unit is one speech (a speaker's line `NAME:` and what follows it up to the next blank
line), so every scheme hands out the same text and only who holds it changes:

- `iid`: speeches dealt to clients uniformly at random;
- `by-play`: whole plays (documents), balanced greedily by size;
- `by-speaker`: LEAF's Shakespeare benchmark (Caldas et al. 2018, arXiv:1812.01097), where
  each speaking role of each play is a client: the N roles with the most text;
- `dirichlet:A`: each play's speeches spread over clients in proportions drawn from
  Dirichlet(A) (Hsu et al. 2019, arXiv:1909.06335); small A is very non-IID.

Each client keeps every tenth of its speeches as held-out text (LEAF splits each client's
samples, not the clients), so per-client held-out loss measures how the global model serves
that client.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trustgen import io
from trustgen.data.text import DOCUMENT_SEPARATOR, Document
from trustgen.errors import TrustgenError

SCHEMES = ("iid", "by-play", "by-speaker", "dirichlet:A")
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
    elif kind == "dirichlet":
        groups = _dirichlet(units, clients, alpha, rng)
    else:
        owner = rng.integers(clients, size=len(units))
        groups = [(f"client-{i}", [u for u, o in zip(units, owner, strict=True) if o == i]) for i in range(clients)]
    return [_split(name, group) for name, group in groups]


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


def _dirichlet(units: list[Speech], clients: int, alpha: float,
               rng: np.random.Generator) -> list[tuple[str, list[Speech]]]:
    plays: dict[str, list[Speech]] = defaultdict(list)
    for unit in units:
        plays[unit.play].append(unit)
    groups: list[list[Speech]] = [[] for _ in range(clients)]
    for play in sorted(plays):
        shares = rng.dirichlet([alpha] * clients)
        owner = rng.choice(clients, size=len(plays[play]), p=shares)
        for unit, o in zip(plays[play], owner, strict=True):
            groups[o].append(unit)
    return [(f"client-{i}", group) for i, group in enumerate(groups)]


def _split(name: str, group: list[Speech]) -> ClientText:
    if len(group) < HELD_OUT_EVERY:
        raise TrustgenError(f"client {name!r} got {len(group)} speeches, too few to hold some out; "
                            "use fewer clients or a less skewed partition.")
    val = [u.text for i, u in enumerate(group) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [u.text for i, u in enumerate(group) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return ClientText(name, DOCUMENT_SEPARATOR.join(train) + "\n", DOCUMENT_SEPARATOR.join(val) + "\n")


def write_client_folders(parts: list[ClientText], folder: Path) -> list[Path]:
    """One data folder per client (train.txt, val.txt, name.txt): what a data owner keeps."""
    paths = []
    for i, part in enumerate(parts):
        path = Path(folder) / f"client-{i}"
        path.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(path / "train.txt", part.train)
        io.atomic_write_text(path / "val.txt", part.val)
        io.atomic_write_text(path / "name.txt", part.name + "\n")
        paths.append(path)
    return paths


__all__ = ["SCHEMES", "ClientText", "partition", "speeches", "write_client_folders"]
