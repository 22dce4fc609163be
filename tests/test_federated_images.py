"""Federated image models: the class partition, the settings a federated image run must have,
and in-process federations (the ServerApp's rounds with the ClientApp in this process) of a
tiny VAE and a tiny GAN whose run directories load and generate; the GAN's discriminators stay
with the clients, across rounds and across a resume."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trustgen import api, io
from trustgen.data.images import ImageDataset
from trustgen.errors import TrustgenError
from trustgen.federated.client import train_locally
from trustgen.federated.partition import HELD_OUT_EVERY, partition_images

HAS_FLOWER = importlib.util.find_spec("flwr") is not None
needs_flower = pytest.mark.skipif(not HAS_FLOWER, reason="flwr is not installed (pip install 'trustgen[federated]')")


def numbered_images(per_class: int = 300, classes: int = 3) -> ImageDataset:
    """Images whose first two pixels spell their index, so each can be followed."""
    n = per_class * classes
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    labels = np.repeat(np.arange(classes), per_class)
    return ImageDataset("numbered", images, labels, tuple(str(c) for c in range(classes)))


def ids(part: ImageDataset) -> list[int]:
    return (part.images[:, 0, 0, 0].astype(int) * 256 + part.images[:, 0, 0, 1]).tolist()


def test_images_partition_by_class_each_image_to_one_client() -> None:
    dataset = numbered_images()
    parts = partition_images(dataset, 3, "dirichlet:0.3", seed=7)
    held = [i for p in parts for split in (p.train, p.val) for i in ids(split)]
    assert sorted(held) == list(range(len(dataset.labels)))  # every image once, none in two clients
    # each class spread over the clients in the proportions of its own Dirichlet(0.3) draw
    rng = np.random.default_rng(7)
    for c in range(3):
        shares = rng.dirichlet([0.3] * 3)
        rng.choice(3, size=300, p=shares)
        counts = np.array([(np.concatenate([p.train.labels, p.val.labels]) == c).sum() for p in parts])
        assert np.abs(counts / 300 - shares).max() < 0.1, (c, counts, shares)
    for p in parts:  # every tenth of a client's images held out, labels with their images
        assert len(p.val.labels) == (len(p.train.labels) + len(p.val.labels)) // HELD_OUT_EVERY
        assert all(dataset.labels[i] == label for i, label in zip(ids(p.train), p.train.labels, strict=True))
    iid = partition_images(dataset, 3, "iid", seed=7)
    mixes = np.array([[(p.train.labels == c).mean() for c in range(3)] for p in iid])
    assert np.abs(mixes - 1 / 3).max() < 0.1  # iid: every client sees every class about equally


def test_bad_image_partitions_are_one_sentence() -> None:
    with pytest.raises(TrustgenError, match="images partition iid or dirichlet:A"):
        partition_images(numbered_images(), 2, "by-speaker", seed=0)
    unlabelled = ImageDataset("u", np.zeros((100, 1, 8, 8), np.uint8), np.full(100, -1))
    with pytest.raises(TrustgenError, match="has no classes"):
        partition_images(unlabelled, 2, "dirichlet:0.5", seed=0)
    with pytest.raises(TrustgenError, match="too few to hold some out"):
        partition_images(numbered_images(per_class=5), 2, "iid", seed=0)


def image_federation(run_dir: Path, family: str, rounds: int, strategy: str = "fedavg",
                     **model_settings: object) -> list[Path]:
    """A run directory ready for its rounds: two clients' folders of scikit-learn's 8x8 digits."""
    from trustgen.federated.run import prepare_federation
    from trustgen.federated.settings import federated_settings

    config = api.train_config({"data": "digits", "max_steps": 2, "batch_size": 16, "warmup_steps": 0,
                               "precision": "fp32", "device": "cpu"}, family)
    fed = federated_settings(clients=2, rounds=rounds, partition_scheme="dirichlet:0.5", strategy=strategy,
                             local_steps=2, min_clients=None, proximal_mu=0.0, server_lr=0.01, round_timeout=60,
                             tls=False)
    tiny = {"vae": {"width": 8, "latent_dim": 4}, "gan": {"width": 8, "discriminator_width": 8, "latent_dim": 8}}
    return prepare_federation(run_dir, config, family, {**tiny[family], **model_settings}, fed)


def test_federated_image_runs_refuse_what_needs_the_pooled_images(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="federated gan training needs clusters=0"):
        image_federation(tmp_path / "a", "gan", 1, clusters=20)
    with pytest.raises(TrustgenError, match="federated vae training needs prior='standard'"):
        image_federation(tmp_path / "b", "vae", 1, prior="mixture")
    with pytest.raises(TrustgenError, match="a gan has no such loss"):
        image_federation(tmp_path / "c", "gan", 1, strategy="qfedavg")
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.slow
@needs_flower
def test_a_federated_vae_averages_every_weight_and_generates(tmp_path: Path) -> None:
    from tests.federated_grid import LocalGrid
    from trustgen.federated.server import run_rounds

    run_dir = tmp_path / "vae"
    grid = LocalGrid(image_federation(run_dir, "vae", rounds=2))
    initial = io.read_tensors(run_dir / "model.safetensors")
    run_rounds(grid, run_dir)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["val_loss"]) > 0 for r in rows)
    assert int(rows[-1]["images"]) == 2 * 2 * 2 * 16  # rounds x clients x local steps x batch
    sent = grid.sent[0].content["arrays"]
    assert set(sent.keys()) == set(initial)  # every weight goes out and is averaged
    final = io.read_tensors(run_dir / "model.safetensors")
    assert not torch.equal(final["dec_in.weight"], initial["dec_in.weight"])
    model = api.load(run_dir, device="cpu")
    images = model.generate(4, seed=0)
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    assert model.reconstruct(np.asarray(images)).shape == (4, 1, 8, 8)


@pytest.mark.slow
@needs_flower
def test_a_federated_gan_keeps_each_discriminator_local_across_rounds_and_a_resume(tmp_path: Path) -> None:
    from tests.federated_grid import LocalGrid
    from trustgen.federated.run import resume_settings
    from trustgen.federated.server import run_rounds

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grid = LocalGrid(image_federation(straight, "gan", rounds=2))
    initial = io.read_tensors(straight / "model.safetensors")
    run_rounds(grid, straight)
    # the server never sends, receives or averages a discriminator
    for record in [m.content["arrays"] for m in grid.sent] + [r["arrays"] for r in grid.received]:
        assert set(record.keys()) == {k for k in initial if not k.startswith("discriminator.")}
    final = io.read_tensors(straight / "model.safetensors")
    assert all(torch.equal(final[k], initial[k]) for k in initial if k.startswith("discriminator."))
    assert not torch.equal(final["ema.project.weight"], initial["ema.project.weight"])
    # each client's own discriminator, trained in both rounds, stays in its data folder
    local = [io.read_tensors(straight / "clients" / f"client-{i}" / "local_state" / "round-2.safetensors")
             for i in range(2)]
    key = "discriminator.hidden.parametrizations.weight.original"
    assert not torch.equal(local[0][key], local[1][key]) and not torch.equal(local[0][key], initial[key])
    # client 0's round 2 started from its round-1 discriminator: without it, another update
    [message] = [m for m in grid.sent[2:] if m.metadata.dst_node_id == 1]  # LocalGrid: client 0 is node 1
    settings = json.loads(str(message.content["config"]["settings"]))
    received = message.content["arrays"].to_torch_state_dict()
    folder = straight / "clients" / "client-0"
    [reply] = [r for r in grid.received[2:] if r["metrics"]["partition-id"] == 0]
    sent_back = reply["arrays"].to_torch_state_dict()
    again, _ = train_locally(received, settings, folder, 0, server_round=2)
    assert all(torch.equal(again[k], sent_back[k]) for k in sent_back)
    (folder / "local_state" / "round-1.safetensors").unlink()
    forgetful, _ = train_locally(received, settings, folder, 0, server_round=2)
    assert not torch.equal(forgetful["generator.project.weight"], sent_back["generator.project.weight"])
    # 1 round, a restart from what was committed, then round 2: the same as 2 rounds straight
    run_rounds(LocalGrid(image_federation(resumed, "gan", rounds=1)), resumed)
    _, folders = resume_settings(resumed, rounds=2)
    run_rounds(LocalGrid(folders), resumed)
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    images = api.load(straight, device="cpu").generate(4, seed=0)
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
