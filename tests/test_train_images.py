"""Image models in the one training loop: learning, run contents, exact resume, folders, the CLI."""

import csv
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trustgen
from trustgen import io, runs, runtime
from trustgen.data.images import load_images
from trustgen.errors import TrainingInterrupted, TrustgenError
from trustgen.training.trainer import Trainer

TINY_GAN = {"latent_dim": 16, "width": 8, "max_width": 32}
TINY_VAE = {"latent_dim": 4, "width": 8, "max_width": 32}
FAST = {"batch_size": 32, "log_interval": 5}


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_vae_on_digits_lowers_the_held_out_negative_elbo_and_writes_its_pictures(tmp_path: Path) -> None:
    run = tmp_path / "vae"
    summary = trustgen.train(run, model="vae", data="digits", model_config=TINY_VAE, max_steps=60,
                             eval_interval=10, warmup_steps=5, progress=False, **FAST)
    losses = [float(r["val_neg_elbo"]) for r in metric_rows(run) if r["val_neg_elbo"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 3  # nats per 8x8 image
    assert summary["final_val_neg_elbo"] == pytest.approx(summary["final_val_loss"])  # beta = 1
    assert summary["final_val_recon"] + summary["final_val_kl"] == pytest.approx(summary["final_val_loss"])
    for name in ("config.json", "model.safetensors", "trainer_state.json", "optimizer.safetensors",
                 "metrics.csv", "loss.png", "summary.json", "samples.png", "interpolation.png",
                 "reconstructions.png"):
        assert (run / name).is_file(), name
    config = runs.read_run_config(run)
    assert config["family"] == "vae" and config["tokenizer"] is None and config["classes"] == list("0123456789")
    model = trustgen.load(run)
    assert isinstance(model, trustgen.ImageModel)
    info = model.info()
    assert info["images_seen"] == 60 * 32 and "reconstructions.png" in info["pictures"]
    assert info["data"]["train_images"] + info["data"]["val_images"] == 1797
    with Image.open(run / "samples.png") as picture:
        assert picture.size[0] > 8 * 8  # small digits are enlarged in the grid
    # New runs sample from a mixture fitted to the training codes when training ended.
    vae = model.model
    assert config["model"]["prior"] == "mixture" and not torch.allclose(vae.prior_means, torch.zeros(1))
    digits = torch.from_numpy(load_images("digits").images).float() / 255
    codes = vae.encode(digits)[0].detach()

    def distance_to_the_codes(latents: torch.Tensor) -> float:
        return torch.cdist(latents, codes).min(dim=1).values.mean().item()

    drawn = vae.draw_latents(2000, torch.Generator().manual_seed(0))
    standard = torch.randn(2000, vae.latent_dim, generator=torch.Generator().manual_seed(0))
    assert distance_to_the_codes(drawn) < 0.7 * distance_to_the_codes(standard)
    # ... and show the decoder at a temperature fitted then too.
    assert config["model"]["fit_temperature"] and vae.temperature.item() != 1.0


@pytest.mark.slow
def test_the_progress_display_says_when_the_model_fits_the_data_outside_the_steps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A self-conditioned GAN clusters its images before the first step; without a line saying
    # so, a large folder would leave the terminal silent for a minute.
    trustgen.train(tmp_path / "gan", model="gan", data="digits", model_config=TINY_GAN, max_steps=2,
                   progress=True, **FAST)
    shown = capsys.readouterr().err
    assert "preparing the model on the training data" in shown
    assert "finishing the model on the training data" in shown


@pytest.mark.slow
def test_gan_trains_both_players_and_samples_from_the_average(tmp_path: Path) -> None:
    run = tmp_path / "gan"
    summary = trustgen.train(run, model="gan", data="digits", model_config=TINY_GAN, max_steps=20,
                             eval_interval=10, progress=False, **FAST)
    assert summary["final_val_loss"] is None and summary["step"] == 20
    # Subnormals were flushed only while training: the process's arithmetic is as it was.
    assert (torch.tensor([1e-38]) / 100).item() != 0.0
    rows = metric_rows(run)
    assert {"d_loss", "g_loss", "r1", "d_real", "d_fake"} <= set(rows[0])
    assert all(r["d_loss"] and r["g_loss"] for r in rows)
    assert any(float(r["r1"]) > 0 for r in rows)  # the lazy penalty ran
    state = io.read_json(run / "trainer_state.json")
    assert set(state["optimizer_param_groups"]) == {"generator", "discriminator"}
    model = trustgen.load(run)
    # New unconditional GANs condition themselves on clusters of the training images.
    assert model.model.config.clusters == 20 and model.model.config.n_classes == 0
    assert model.model.cluster_weights.sum().item() == pytest.approx(1.0)
    assert (model.model.cluster_weights > 0).sum() == 20
    images = model.generate(6, seed=3)
    assert images.shape == (6, 1, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images, model.generate(6, seed=3))
    assert not np.array_equal(images, model.generate(6, seed=4))


def test_two_learning_rates_follow_the_schedule_together(tmp_path: Path) -> None:
    config = trustgen.api.train_config({"max_steps": 10, "learning_rate": 1e-3, "discriminator_lr": 4e-3}, "gan")
    from trustgen.models import GAN, GANConfig
    from trustgen.training.adversarial import Adversarial

    objective = Adversarial(GAN(GANConfig(image_size=8, clusters=0, width=8, max_width=16, latent_dim=4)), config,
                            torch.device("cpu"))
    batch = (torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    objective.step([batch], 5e-4, runtime.autocast_context(torch.device("cpu"), "fp32"))
    assert objective.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(5e-4)
    assert objective.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gan", "vae"])
def test_an_interrupted_image_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  family: str) -> None:
    settings = {"model": family, "data": "digits", "model_config": TINY_GAN if family == "gan" else TINY_VAE,
                "max_steps": 12, "eval_interval": 4, "progress": False, **FAST}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    trustgen.train(straight, **settings)

    real_step = Trainer.step

    def interrupt_in_step_8(self: Trainer, progress: float) -> dict:
        if self.step_count == 7:  # Ctrl-C in the middle of a step: the loop finishes it, then stops
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, progress)

    monkeypatch.setattr(Trainer, "step", interrupt_in_step_8)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at step 8"):
        trustgen.train(stopped, **settings)
    monkeypatch.setattr(Trainer, "step", real_step)
    trustgen.resume(stopped, progress=False)
    a, b = io.read_tensors(straight / "model.safetensors"), io.read_tensors(stopped / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_conditional_gan_generates_the_class_a_prompt_names(tmp_path: Path) -> None:
    run = tmp_path / "cgan"
    trustgen.train(run, model="gan", data="digits", model_config={**TINY_GAN, "conditional": True},
                   max_steps=4, progress=False, **FAST)
    model = trustgen.load(run)
    assert model.classes == tuple("0123456789") and model.model.config.n_classes == 10
    assert model.model.config.clusters == 0  # conditioned on the classes instead
    assert model.labels(3, "7").tolist() == [7, 7, 7]
    assert model.labels(3, "seven").tolist() == [7, 7, 7] and model.labels(2, "Seven").tolist() == [7, 7]
    assert model.labels(12).tolist() == [*range(10), 0, 1]  # no prompt: every class in turn
    assert model.generate(4, prompt="3", seed=0).shape == (4, 1, 8, 8)
    with pytest.raises(TrustgenError, match=r"unknown label 'eleven'.*0, 1, 2"):
        model.generate(2, prompt="eleven")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gan", "vae"])
def test_an_unconditional_model_takes_no_prompt(tmp_path: Path, family: str) -> None:
    run = tmp_path / family
    trustgen.train(run, model=family, data="digits", model_config=TINY_GAN if family == "gan" else TINY_VAE,
                   max_steps=2, progress=False, **FAST)
    with pytest.raises(TrustgenError, match="without classes"):  # a GAN's clusters are not labels
        trustgen.load(run).generate(2, prompt="7")


def make_photos(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.mark.slow
def test_a_folder_of_photos_trains_a_conditional_rgb_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_photos(tmp_path / "photos")
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="trustgen"):
        trustgen.train(run, model="vae", data=str(folder), image_size=16, model_config={**TINY_VAE, "conditional": True},
                       max_steps=3, progress=False, **FAST)
    assert "skipped 1 file" in caplog.text and "broken.jpg" in caplog.text
    model = trustgen.load(run)
    assert model.classes == ("blue", "red")
    red = model.generate(2, prompt="red", seed=0)
    assert red.shape == (2, 3, 16, 16)
    info = model.info()
    assert info["data"]["skipped_files"] == [str(Path("red") / "broken.jpg")]


@pytest.mark.slow
def test_an_unconditional_gan_clusters_a_folder_of_rgb_photos(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(60):  # no class folders: red and blue photos side by side
        colour = (220, 30, 30) if i % 2 else (30, 30, 220)
        pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    run = tmp_path / "run"
    trustgen.train(run, model="gan", data=str(folder), image_size=64, model_config=TINY_GAN, max_steps=2,
                   progress=False, **FAST)
    model = trustgen.load(run)
    gan = model.model
    assert model.classes == () and gan.cluster_projection.shape == (3 * 32 * 32, 20)  # clustered at 32x32
    assert model.info()["data"]["train_images"] >= 40
    assert (gan.cluster_weights > 0).sum() == 2  # 2 kinds of photo, and too few for more than 1 cluster per 20
    red, blue = (torch.tensor(c).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 255 for c in ((220, 30, 30), (30, 30, 220)))
    assert gan.conditions(red, None).item() != gan.conditions(blue, None).item()
    assert model.generate(3, seed=0).shape == (3, 3, 64, 64)


def test_image_training_errors_are_clear(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrustgenError, match="no PNG, JPEG or WebP"):
        trustgen.train(tmp_path / "a", model="gan", data=str(empty), max_steps=1, progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(flat / f"{i}.png")
    with pytest.raises(TrustgenError, match="setting conditional needs labelled images"):
        trustgen.train(tmp_path / "b", model="gan", data=str(flat), model_config={"conditional": True},
                       max_steps=1, progress=False)
    with pytest.raises(TrustgenError, match=r"come.*from the data"):
        trustgen.train(tmp_path / "c", model="vae", data="digits", model_config={"image_size": 32},
                       max_steps=1, progress=False)
    with pytest.raises(TrustgenError, match="image_size"):
        trustgen.train(tmp_path / "d", model="vae", data="digits", image_size=30, max_steps=1, progress=False)
    with pytest.raises(TrustgenError, match="grad_accum"):
        trustgen.train(tmp_path / "e", model="gan", data="digits", grad_accum=2, max_steps=1, progress=False)


def test_image_families_default_to_mnist_and_ten_minutes() -> None:
    gan = trustgen.api.train_config({}, "gan")
    assert gan.data == "mnist" and gan.time_budget == 600 and gan.beta1 == 0.0
    assert trustgen.api.train_config({"max_steps": 5}, "vae").time_budget is None
    assert trustgen.api.train_config({}, "gpt").data == "shakespeare"


@pytest.mark.slow
def test_evaluate_reports_the_floor_and_conditional_accuracy(tmp_path: Path) -> None:
    run = tmp_path / "cvae"
    trustgen.train(run, model="vae", data="digits", model_config={**TINY_VAE, "conditional": True},
                   max_steps=3, progress=False, **FAST)
    report = trustgen.load(run).evaluate(200, progress=False)
    assert {"model", "matched", "floor", "fid_ratio", "conditional_accuracy"} <= set(report)
    assert report["samples"] == 200 and report["floor"]["n"] == report["matched"]["n"]
    assert 0 <= report["conditional_accuracy"] <= 1
    assert io.read_json(run / "evaluation.json")["samples"] == 200
    assert trustgen.load(run).info()["evaluation"]["seed"] == 0


PAGE_FAULTS_OF_VAE_STEPS = """
import resource, sys, torch
from trustgen.models import VAE, VAEConfig
from trustgen import runtime
if sys.argv[1] == "kept":
    runtime.keep_freed_memory()
torch.manual_seed(0)
model = VAE(VAEConfig(width=48)).to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters())
x = torch.rand(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
for step in range(20):
    if step == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss, _ = model.loss(x, torch.zeros(64, dtype=torch.long))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_training_keeps_freed_memory_instead_of_faulting_it_back_in_every_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def page_faults(allocator: str) -> int:
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_VAE_STEPS, allocator],
                              capture_output=True, text=True, check=True)
        return int(done.stdout)

    # glibc's default hands the memory a VAE step frees back to the OS (here: ~20,000 page faults
    # a step); kept, a step reuses the last one's.
    assert page_faults("kept") < 0.1 * page_faults("default") + 1000
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True))
    trustgen.train(tmp_path / "vae", model="vae", data="digits", model_config=TINY_VAE, max_steps=1,
                   progress=False, **FAST)
    assert calls  # training on the CPU asks for it
